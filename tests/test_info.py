"""`nanoseek info`: a preset or a model folder; anything else is one clear line and exit 2 (no traceback)."""

import subprocess
import sys

import pytest

from nanoseek import info
from nanoseek.cli import main as cli
from nanoseek.config import PRESETS
from nanoseek.errors import UsageError
from nanoseek.options import make_config


def test_a_preset_prints_parameters_and_cache_size(capsys):
    assert info.main(make_config(info.CONFIG, what="cpu")) == 0
    out = capsys.readouterr().out
    assert "model cpu" in out and "parameters:" in out and "KV cache per token" in out


def test_an_unknown_preset_lists_the_presets():
    with pytest.raises(UsageError) as e:
        info.main(make_config(info.CONFIG, what="v4"))
    msg = str(e.value)
    assert "unknown preset 'v4'" in msg and all(name in msg for name in PRESETS) and "\n" not in msg


def test_a_missing_folder_is_neither_a_preset_nor_a_folder(tmp_path):
    with pytest.raises(UsageError, match="neither a preset nor a model folder .no such folder."):
        info.main(make_config(info.CONFIG, what="runs/nope"))
    (tmp_path / "empty").mkdir()          # a folder, but not a model folder
    with pytest.raises(UsageError, match="config.json"):
        info.main(make_config(info.CONFIG, what=str(tmp_path / "empty")))


def test_the_command_line_prints_one_error_line_and_exits_2(capsys):
    for what in ("v4", "runs/nope"):
        assert cli(["info", "--what", what]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and what in err[0], err


def test_import_nanoseek_does_not_import_torch():
    # `nanoseek --help` must stay fast: the package's public names load on first use
    public = {"ModelConfig", "PRESETS", "Transformer", "LatentCache", "KVCache", "load", "save", "Tokenizer", "Engine",
              "SamplingParams", "Completion"}
    code = (f"import sys, nanoseek as ns; assert 'torch' not in sys.modules, 'torch imported'; "
            f"assert set(ns.__all__) == {public!r} and set(ns.__all__) <= set(dir(ns)); "
            f"assert ns.LatentCache.__module__ == 'nanoseek.infer.cache'; assert 'torch' in sys.modules; "
            f"assert all(getattr(ns, n) is not None for n in ns.__all__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
