"""Where the independent meta-trainings of ``ml3 reproduce`` run: local processes, or a Ray cluster.

A run is one ``ml3 meta-train`` command line that writes one artifact and its companions (``ARTIFACT.curves.csv``,
``.curves.png``, ``.checkpoint.safetensors``). A launcher runs many such runs, a few at a time, and leaves every
file at the path the run names, whichever machine did the work, with the run's output in ``ARTIFACT.log``:

* :class:`LocalLauncher` (the default, ``--jobs N``): N processes on this machine;
* :class:`RayLauncher` (``--launcher ray [--address ADDR]``): one Ray task per run, one CPU each. Without an address
  Ray starts a cluster on this machine with ``--jobs`` CPUs; with one (``auto``, or ``ray://HOST:PORT``) the runs go
  to that cluster, whose machines need ml3 installed as here. Each run works in a temporary folder of the machine
  that runs it and sends its files back, so no shared file system is needed.

A meta-training is deterministic for its recipe, seed and thread count, so the artifacts do not depend on where
they were made (on machines of one CPU type: float kernels differ between CPU models). One meta-training across
several machines is torchrun's job (``ml3 meta-train --nproc``, docs/distributed.md), not a launcher's.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ml3cli import files
from ml3cli.errors import ML3Error


@dataclass(frozen=True)
class Run:
    """One meta-training: ``ml3`` arguments without ``--out``, and the artifact path it writes."""

    arguments: tuple[str, ...]
    artifact: Path

    @property
    def log(self) -> Path:
        return self.artifact.with_suffix(".log")


@dataclass(frozen=True)
class Finished:
    """A run's exit code and wall seconds."""

    run: Run
    code: int
    seconds: float


class Launcher(Protocol):
    """Runs every run, ``on_finished`` called as each ends (from any thread); returns them in the given order."""

    def run_all(self, runs: Sequence[Run], on_finished: Callable[[Finished], None]) -> list[Finished]: ...


def ml3_command(run: Run, artifact: Path) -> list[str]:
    """The process that runs ``run`` writing its artifact to ``artifact``."""
    return [sys.executable, "-m", "ml3cli", *run.arguments, "--out", str(artifact)]


@dataclass(frozen=True)
class LocalLauncher:
    """``jobs`` processes at a time on this machine, each writing straight to its artifact path."""

    jobs: int = 1

    def run_all(self, runs: Sequence[Run], on_finished: Callable[[Finished], None]) -> list[Finished]:
        def one(run: Run) -> Finished:
            run.artifact.parent.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            with open(run.log, "w", encoding="utf-8") as log:
                code = subprocess.call(ml3_command(run, run.artifact), stdout=log, stderr=subprocess.STDOUT)
            finished = Finished(run, code, time.perf_counter() - started)
            on_finished(finished)
            return finished

        with ThreadPoolExecutor(max_workers=max(1, self.jobs)) as pool:
            return list(pool.map(one, runs))


def run_in_temporary_folder(arguments: Sequence[str], name: str) -> tuple[int, float, dict[str, bytes], str]:
    """What a Ray worker does for one run: run it in a fresh folder, and return its exit code, wall seconds, the
    files it wrote beside ``name`` (the artifact and its companions) and its output."""
    with tempfile.TemporaryDirectory(prefix="ml3-run-") as folder:
        artifact = Path(folder) / name
        started = time.perf_counter()
        done = subprocess.run(
            ml3_command(Run(tuple(arguments), artifact), artifact), cwd=folder, capture_output=True, text=True
        )
        seconds = time.perf_counter() - started
        produced = {
            path.name: path.read_bytes()
            for path in Path(folder).iterdir()
            if path.is_file() and path.name.startswith(artifact.stem + ".") and not path.name.endswith(".lock")
        }
        return done.returncode, seconds, produced, done.stdout + done.stderr


@dataclass(frozen=True)
class RayLauncher:
    """One Ray task per run (one CPU each) on the cluster at ``address``, or on a local one of ``jobs`` CPUs."""

    jobs: int = 1
    address: str | None = None

    def run_all(self, runs: Sequence[Run], on_finished: Callable[[Finished], None]) -> list[Finished]:
        try:
            import ray
        except ImportError:
            raise ML3Error(
                "--launcher ray needs Ray: pip install 'ml3cli[ray]' (or -e \".[ray]\" in a clone)"
            ) from None
        started_here = not ray.is_initialized()
        if started_here:
            try:
                if self.address is None:
                    ray.init(num_cpus=self.jobs, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
                else:
                    ray.init(address=self.address, log_to_driver=False, logging_level="ERROR")
            except (ConnectionError, RuntimeError, ValueError) as err:
                where = f"at {self.address}" if self.address else "on this machine"
                raise ML3Error(f"cannot start or reach a Ray cluster {where}: {err}") from None
        try:
            remote = ray.remote(num_cpus=1, max_retries=0)(run_in_temporary_folder)
            pending = {remote.remote(list(run.arguments), run.artifact.name): run for run in runs}
            results: dict[Run, Finished] = {}
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                run = pending.pop(ready[0])
                code, seconds, produced, output = ray.get(ready[0])
                run.artifact.parent.mkdir(parents=True, exist_ok=True)
                for name, data in produced.items():
                    files.write_bytes_atomic(run.artifact.with_name(name), data)
                files.write_text_atomic(run.log, output)
                results[run] = Finished(run, code, seconds)
                on_finished(results[run])
            return [results[run] for run in runs]
        finally:
            if started_here:
                ray.shutdown()


def launcher_for(name: str, jobs: int, address: str | None) -> Launcher:
    """The launcher ``--launcher NAME`` asks for."""
    if name == "local":
        if address is not None:
            raise ML3Error("--address names a Ray cluster: add --launcher ray")
        return LocalLauncher(jobs)
    if name == "ray":
        return RayLauncher(jobs, address)
    raise ML3Error(f"--launcher {name!r}: expected local or ray")
