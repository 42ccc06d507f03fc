"""A module without any shardworker.App (for the error-message test)."""
VALUE = 1
