import contextlib
import os
import signal
import sys
import threading
import zlib

import pytest
import torch
import torch._functorch.config

# The tests import their helpers as plain modules (`from comparisons import ...`,
# `import foreign_models as fm`), never through a package named `tests`: some packages on the registry
# install a top-level `tests` package of their own, which would win over this folder. This folder goes
# first on sys.path whatever pytest's import mode (prepend puts it there too; importlib does not).
TESTS_FOLDER = os.path.dirname(os.path.abspath(__file__))
if TESTS_FOLDER not in sys.path:
    sys.path.insert(0, TESTS_FOLDER)

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter, which
# must be switched on before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Fused units check themselves against eager PyTorch the first time a configuration runs
# (fused_preact/self_check.py): in the tests, which compare every unit with float64 themselves, that
# would double the first call of each test's units (Triton's interpreter included). Off here; the
# tests of the check (test_self_check.py) turn it on, and subprocesses inherit the setting.
os.environ.setdefault("FUSED_PREACT_SELF_CHECK", "0")

# A custom operator whose outputs alias its inputs or each other is an error under torch.compile
# when CI is set (torch's default follows the CI variable): make it one everywhere, so a local run
# fails where CI would (older torch versions have no such switch).
if hasattr(torch._functorch.config, "error_on_custom_op_aliasing"):
    torch._functorch.config.error_on_custom_op_aliasing = True


# -- the default run and the full sweep -------------------------------------------------------------
# The default run covers every code path once; tests marked ``full`` (the cross products: every shape x
# dtype x variant x backend, long interpreter sweeps, convergence runs) run only when asked for:
# ``pytest --full`` (or FUSED_PREACT_FULL_TESTS=1: everything), or ``pytest -m full`` (only them).
def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help="also run the tests marked 'full' (the whole cross-product sweep)")


def full_run_requested(config) -> bool:
    return (config.getoption("--full") or os.environ.get("FUSED_PREACT_FULL_TESTS", "") == "1"
            or "full" in (config.getoption("markexpr") or ""))


def pytest_itemcollected(item):
    """A sample of a cross product in the default run (``@pytest.mark.default_cases``): each code path
    once, the rest of the product marked ``full`` (before -m selects by mark, so ``-m full`` runs it)."""
    marker = item.get_closest_marker("default_cases")
    if marker is None or not hasattr(item, "callspec"):
        return
    keep = marker.kwargs.get("keep")   # a keyword: a lone callable argument would decorate the mark
    ids = set(marker.kwargs.get("ids", ()))
    if not (item.callspec.id in ids or (keep is not None and keep(item.callspec.params))):
        item.add_marker(pytest.mark.full)


@pytest.fixture
def one_cpu_thread():
    """The 2 CPU cores are shared: threads only slow small convs down here (whole training runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_training_plots(monkeypatch):
    """Trainer runs without their PNG curves (about 1 s of matplotlib per finished run here), for tests
    about something else; tests/test_train_loop.py checks the plots."""
    from fused_preact.train import plots
    monkeypatch.setattr(plots, "training_curves", lambda path, *args, **kwargs: None)


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Each test draws its own random inputs, reproducibly (seeded by its id)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


# -- per-test time limit without pytest-timeout ----------------------------------------------------
# bench/device_run.sh sets FUSED_PREACT_TEST_TIMEOUT (seconds) where pytest-timeout is not installed:
# a test (its setup included) that runs longer fails with a message, and the run goes on. A hang
# inside C code (a GPU wait) is not interrupted here: the script's per-step `timeout` ends that.
def _alarm_seconds(item) -> float:
    try:
        seconds = float(os.environ.get("FUSED_PREACT_TEST_TIMEOUT", "0") or 0)
    except ValueError:
        raise pytest.UsageError("FUSED_PREACT_TEST_TIMEOUT must be a number of seconds, got "
                                f"{os.environ['FUSED_PREACT_TEST_TIMEOUT']!r}")
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        return 0.0
    try:
        if item.config.getoption("timeout", None):   # pytest-timeout is doing it
            return 0.0
    except ValueError:
        pass
    return seconds


@contextlib.contextmanager
def _alarm(item, phase):
    """Fail ``phase`` of ``item`` once it runs over FUSED_PREACT_TEST_TIMEOUT (when set)."""
    seconds = _alarm_seconds(item)
    if not seconds:
        yield
        return

    def expire(signum, frame):
        pytest.fail(f"{phase} ran over FUSED_PREACT_TEST_TIMEOUT={seconds:g} s", pytrace=False)
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with _alarm(item, "setup"):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _alarm(item, "the test"):
        yield


# -- a sample of each parametrized test ------------------------------------------------------------
# FUSED_PREACT_SAMPLE_PER_TEST=N keeps N evenly spaced cases of each test function (all dtypes and
# variants still drawn from): bench/device_run.sh runs the CUDA operator tests under compute-sanitizer,
# which slows every kernel many times, on such a sample.
@pytest.hookimpl(trylast=True)   # after -m and -k have deselected
def pytest_collection_modifyitems(config, items):
    if not full_run_requested(config):
        sweep = [item for item in items if item.get_closest_marker("full") is not None]
        if sweep:
            config.hook.pytest_deselected(items=sweep)
            items[:] = [item for item in items if item.get_closest_marker("full") is None]
    text = os.environ.get("FUSED_PREACT_SAMPLE_PER_TEST", "").strip()
    if not text:
        return
    if not text.isdigit() or int(text) < 1:
        raise pytest.UsageError(f"FUSED_PREACT_SAMPLE_PER_TEST must be a positive integer, got {text!r}")
    keep_per_test = int(text)
    groups: dict = {}
    for item in items:
        groups.setdefault((item.path, getattr(item, "originalname", item.name)), []).append(item)
    kept = set()
    for group in groups.values():
        step = len(group) / keep_per_test
        kept.update(id(group[int(i * step)]) for i in range(min(keep_per_test, len(group))))
    deselected = [item for item in items if id(item) not in kept]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if id(item) in kept]
