"""The command line restarts itself once with glibc's huge-page malloc where the host allows it."""
import os
import subprocess
import sys

import pytest

from rmjax import cli

THP_MADVISE = "always [madvise] never\n"


def test_hugepage_env_decisions():
    env = cli.hugepage_env({"PATH": "/bin"}, THP_MADVISE, "glibc 2.36")
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": cli.HUGEPAGE_TUNABLE}
    kept = cli.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "[always] madvise never", "glibc 2.39")
    assert kept["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + cli.HUGEPAGE_TUNABLE
    assert cli.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, THP_MADVISE, "glibc 2.36") is None
    assert cli.hugepage_env({"RMJAX_HUGEPAGES": "0"}, THP_MADVISE, "glibc 2.36") is None
    assert cli.hugepage_env({}, "always madvise [never]\n", "glibc 2.36") is None
    assert cli.hugepage_env({}, THP_MADVISE, "glibc 2.31") is None  # no hugetlb tunable before 2.35
    assert cli.hugepage_env({}, THP_MADVISE, None) is None  # not glibc (musl)
    assert cli.hugepage_env({}, None, "glibc 2.36") is None  # no transparent huge pages


_PROBE = ("import os; print('start', os.getpid(), flush=True); from rmjax import cli; cli.restart_with_hugepages(); "
          "print('tunables', os.environ.get('GLIBC_TUNABLES', ''))")


def _probe(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "RMJAX_HUGEPAGES")} | extra
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


@pytest.mark.skipif(cli.host_hugepage_env({}) is None, reason="this host has no transparent huge pages for glibc's malloc")
def test_restart_happens_once_in_the_same_process():
    lines = _probe()
    starts = [ln for ln in lines if ln.startswith("start")]
    assert len(starts) == 2 and starts[0] == starts[1]  # re-executed once, same pid
    assert lines[-1] == "tunables " + cli.HUGEPAGE_TUNABLE


def test_restart_can_be_turned_off():
    lines = _probe(RMJAX_HUGEPAGES="0")
    assert [ln.split()[0] for ln in lines] == ["start", "tunables"] and lines[-1].strip() == "tunables"
