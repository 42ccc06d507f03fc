"""CLI conventions (issue 15, point 7): every option also comes from a SHARDSUP_*
environment variable, ``start --help`` lists its options in sections, ``--version``."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from shardworker import __version__
from supervisor.cli import cli

pytestmark = pytest.mark.timeout(20)


def test_every_option_of_every_command_has_a_shardsup_environment_variable():
    import click

    for name, command in cli.commands.items():
        for param in command.params:
            if isinstance(param, click.Option) and param.name != "help":
                assert param.envvar and param.envvar.startswith("SHARDSUP_"), (name, param.name)
    assert {p.name: p.envvar for p in cli.commands["start"].params}["datadir"] == "SHARDSUP_DATADIR"


def test_an_option_comes_from_the_environment(tmp_path):
    missing = tmp_path / "nothing-here"
    result = CliRunner().invoke(cli, ["status"], env={"SHARDSUP_DATADIR": str(missing)})
    assert result.exit_code != 0
    assert str(missing) in result.output


def test_start_help_lists_options_in_sections_and_the_version_is_known():
    help_text = CliRunner().invoke(cli, ["start", "--help"]).output
    sections = ["App and broker:", "Supervision:", "Web server:", "Logging:"]
    assert [help_text.index(s) for s in sections] == sorted(help_text.index(s) for s in sections)
    assert "SHARDSUP_BROKER" in help_text and "SHARDSUP_LOG_FORMAT" in help_text
    assert CliRunner().invoke(cli, ["--version"]).output.strip().endswith(__version__)
