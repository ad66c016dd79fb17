import subprocess
import sys

import spectralcache
from spectralcache.cli import SUBCOMMANDS, build_parser


def test_version_and_lazy_names():
    assert spectralcache.__version__
    assert "SpectralCache" in spectralcache.__all__


def test_cli_help_lists_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "spectralcache.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in SUBCOMMANDS:
        assert name in out


def test_cli_unknown_subcommand_is_a_clear_error():
    proc = subprocess.run(
        [sys.executable, "-m", "spectralcache.cli", "frobnicate"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr


def test_parser_builds_without_importing_subcommands():
    assert build_parser().prog == "spectralcache"
