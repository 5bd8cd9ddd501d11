"""Every error lora_dist raises for bad input or environment is a ``UserError``: one line and exit code 2 from the
CLI, the same type on every rank. The few that are not are caught and translated where they are raised."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil

import pytest

import lora_dist
from lora_dist.cli import EXIT_USAGE, main
from lora_dist.errors import USER_ERRORS, UserError

#: lora_dist's exceptions that never reach the user as themselves, and why.
INTERNAL = {
    "lora_dist.chat.ChatError": "a record's problem; the token cache raises it as a DataError naming the record",
    "lora_dist.chat._Unbounded": "chat_document raises it as a ChatError with the fix that applies",
    "lora_dist.chat._TemplateFails": "a ChatError saying what the template raised; chat_document raises it as one, "
                                     "or as _Unbounded where only a part of the conversation fails",
    "lora_dist.safetensors_file.SafetensorsFormatError": "a file's header; verify reports it, layout raises ExportError",
    "lora_dist.export.verify.VerifyError": "a check that failed: lora-dist verify exits 1, not 2",
    "lora_dist.inputs._TooCostly": "read_yaml raises it as ConfigError",
    "lora_dist.inputs._Repeated": "parse_yaml raises it as the caller's error type (ConfigError for a config)",
    "lora_dist.parallel.engine.ReplicaMismatchError": "the replicas disagree: a bug or a hardware fault, not input",
    "lora_dist.preemption.Preempted": "a requeue request, handled by the loop",
    "lora_dist.ranks.RankFailed": "another rank's crash, with its traceback",
    "lora_dist.sources.SourceSpecError": "data.path's syntax; the config raises it as ConfigError",
    "lora_dist.token_cache._NotStarted": "workers that did not start: a warning, and the rank tokenizes by itself",
}


def _exceptions() -> dict[str, type[BaseException]]:
    out = {}
    for info in pkgutil.walk_packages(lora_dist.__path__, "lora_dist."):
        if info.name.startswith("lora_dist.bench"):
            continue
        module = importlib.import_module(info.name)
        for cls in vars(module).values():
            if inspect.isclass(cls) and issubclass(cls, BaseException) and cls.__module__ == module.__name__:
                out[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return out


def test_every_exception_is_a_user_error_or_is_translated_where_it_is_raised():
    exceptions = _exceptions()
    assert len(exceptions) > 25  # the walk found the package's errors
    assert {name for name, cls in exceptions.items() if not issubclass(cls, UserError)} == set(INTERNAL)


def test_another_rank_raises_each_user_error_as_its_own_type():
    """A user error on one rank stops every rank with the same type and message (lora_dist.ranks), from the module
    its class lives in now; any other error arrives as RankFailed."""
    from lora_dist.ranks import RankFailed, _failure, _raise_for

    user = {name: cls for name, cls in _exceptions().items() if issubclass(cls, USER_ERRORS)}
    assert "lora_dist.errors.ConfigError" in user and "lora_dist.sharding.ShardingError" in user
    for name, cls in user.items():
        with pytest.raises(cls, match="rank 1 failed: the problem; the fix") as e:
            _raise_for(1, _failure(cls("the problem; the fix")))
        assert type(e.value) is cls, name
    with pytest.raises(RankFailed, match="RankFailed"):
        _raise_for(1, _failure(RankFailed("a crash")))


@pytest.mark.parametrize("name", ["lora_dist.plot.PlotError", "lora_dist.sharding.ShardingError",
                                  "lora_dist.export.errors.ExportError", "lora_dist.checkpoint.ResumeError"])
def test_the_cli_reports_a_user_error_from_any_layer_in_one_line(monkeypatch, capsys, name):
    """A UserError subclass raised deep in a command: one line naming the command, exit code 2, no traceback (the
    classes here are no OSError, which the CLI would report as one line anyway)."""
    cls = _exceptions()[name]
    assert not issubclass(cls, OSError)
    import lora_dist.cli as cli

    def fail(args):
        raise cls("the problem; the fix")

    monkeypatch.setitem(cli.COMMANDS, "plot", dataclasses.replace(cli.COMMANDS["plot"], run=fail))
    assert main(["plot", "some_run_dir"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.strip() == "lora-dist plot: error: the problem; the fix"
