from shardworker.launcher import main

main()
