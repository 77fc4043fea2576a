"""jdd.parallel drops JAX's "no libtpu" probe line on machines without libtpu, and nothing else."""
import importlib.util
import logging

import pytest

from jdd import parallel

PROBE = ("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so: libtpu.so: cannot open "
         "shared object file: No such file or directory")


def _record(msg, level=logging.INFO):
    return logging.LogRecord("jax._src.xla_bridge", level, __file__, 1, msg, None, None)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None, reason="libtpu is installed here")
def test_filter_drops_only_the_missing_libtpu_probe():
    f = next(x for x in logging.getLogger("jax._src.xla_bridge").filters if type(x).__name__ == "_NoTpuProbeLine")
    assert not f.filter(_record(PROBE))
    assert f.filter(_record("Unable to initialize backend 'cuda': no CUDA devices found"))
    assert f.filter(_record("Unable to initialize backend 'tpu': TPU initialization failed: chip busy",
                            logging.WARNING))


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None, reason="libtpu is installed here")
def test_installed_once_on_import(caplog):
    parallel.quiet_missing_tpu_probe()  # idempotent
    logger = logging.getLogger("jax._src.xla_bridge")
    assert sum(type(x).__name__ == "_NoTpuProbeLine" for x in logger.filters) == 1
    with caplog.at_level(logging.INFO, logger="jax._src.xla_bridge"):
        logger.info(PROBE)
        logger.info("another backend message")
    assert [r.getMessage() for r in caplog.records] == ["another backend message"]
