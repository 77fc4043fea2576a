"""Every shipped config loads, is locked, and parses its string arguments strictly."""
import importlib.util
import pathlib

import pytest

from jdd import config as jc

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


def load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_locked_with_runlocal(path):
    mod = load(path)
    c = mod.get_config()
    assert c.method_name in path.stem
    with pytest.raises(AttributeError):
        c.syn.not_a_key = 1
    small = mod.get_config("runlocal,ipc=2")
    assert small.syn.ipc == 2 and small.steps < c.steps and small.data.crop_res < c.data.crop_res
    with pytest.raises(ValueError, match="unknown config argument"):
        mod.get_config("ipcc=3")


def test_parse_arg_types_and_flags():
    a = jc.parse_arg("ipc=10,runlocal,name=x", ipc=1, runlocal=False, name="")
    assert a.ipc == 10 and a.runlocal is True and a.name == "x"
    with pytest.raises(ValueError, match="needs a value"):
        jc.parse_arg("ipc", ipc=1)
