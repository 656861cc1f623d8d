"""How `moebus up` shares one machine's cores between its MLX processes (pure)."""

from shared.blas import blas_threads, fast_blas_env


def test_processes_split_the_cores_and_always_get_one():
    assert blas_threads(2, 3) == 1  # router + 2 workers on 2 cores
    assert blas_threads(16, 2) == 8  # router + 1 worker on a 16-core Mac
    assert blas_threads(1, 4) == 1
    assert blas_threads(8, 0) == 8


def test_the_users_thread_count_is_kept(monkeypatch):
    monkeypatch.setattr("shared.blas.find_openblas", lambda: "/usr/lib/libopenblas.so.0")
    monkeypatch.setattr("shared.blas.sys.platform", "linux")
    env = fast_blas_env({"OPENBLAS_NUM_THREADS": "3"})
    assert env == {"OPENBLAS_NUM_THREADS": "3", "LD_PRELOAD": "/usr/lib/libopenblas.so.0"}
    assert fast_blas_env({"MOEBUS_BLAS": "reference"}) is None
