"""The embedded Ray never outlives its driver: a small watcher process ends the session's processes.

``raysetup.init_ray`` starts it beside an embedded local Ray. It polls the driver; when the driver is
gone (killed, crashed: no ``ray.shutdown`` ran), it ends every process of that Ray session: those whose
command line names the session's folder (GCS, raylet, dashboard, monitors, agents) and all their
descendants (workers, runtime-env and dashboard agents), SIGTERM first, SIGKILL after a grace period.
It never touches another session's processes (no ``ray stop``). It exits on its own once the session
has no process left (after a clean ``ray.shutdown``), ending first any worker it saw that the shutdown
left running.

Run (by ``init_ray``): ``python -m mta_ray.engine.reaper DRIVER_PID SESSION_DIR``.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

POLL_S = 0.5
GRACE_S = 3.0


def _stat(pid: int | str) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name (state first, then the parent's pid, ...;
    start time at 19); empty if the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    fields = _stat(pid)
    return bool(fields) and fields[0] not in ("Z", "X")


def start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot): with the pid, it names one process, not a reused pid."""
    fields = _stat(pid)
    return fields[19] if len(fields) > 19 else None


def _same_alive(pid: int, started: str | None) -> bool:
    """``pid`` is still the process that started at ``started``, and not a zombie (one read of its stat)."""
    fields = _stat(pid)
    return started is not None and len(fields) > 19 and fields[19] == started and fields[0] not in ("Z", "X")


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process we can see."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or len(fields := _stat(entry)) < 2:
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[int(entry)] = (int(fields[1]), cmd)
    return out


def session_processes(session_dir: str, exclude: int | None = None) -> set[int]:
    """The session's processes: those naming its folder, and their descendants."""
    procs = _processes()
    name = os.path.basename(session_dir.rstrip("/"))
    found = {pid for pid, (_, cmd) in procs.items() if name in cmd and pid != exclude}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found and child != exclude:
                found.add(child)
                todo.append(child)
    found.discard(os.getpid())
    return found


def end_session(session_dir: str, known: set[int] = frozenset()) -> int:
    """SIGTERM the session's processes (and ``known``: those seen while the driver lived, which the agents
    are once the raylet died and they lost their parent and renamed themselves ``ray::...``), then
    SIGKILL what is left after the grace period; returns how many were left."""
    pids = session_processes(session_dir) | {p for p in known if alive(p)}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + GRACE_S
        while time.time() < deadline and any(alive(p) for p in pids):
            time.sleep(0.1)
        pids = {p for p in pids if alive(p)} | session_processes(session_dir)
        if not pids:
            break
    return len(pids)


def _log(session_dir: str, text: str) -> None:
    """A line in ``<session>/logs/mta_ray_reaper.log`` (what the watcher saw and ended)."""
    try:
        with open(Path(session_dir) / "logs" / "mta_ray_reaper.log", "a") as fh:
            fh.write(f"{time.strftime('%H:%M:%S')} {text}\n")
    except OSError:
        pass


def watch(driver: int, session_dir: str) -> None:
    """Poll the driver; remember the session's processes as they appear; end them when the driver dies.

    After a clean ``ray.shutdown`` (the session's named processes gone), a remembered worker may still be
    alive, orphaned: Ray 2.60's ``TrainController`` was seen to finish its shutdown and never exit. Those
    are ended too, after a grace period to exit on their own."""
    _log(session_dir, f"watching driver {driver}")
    polls, known = 0, {}
    while alive(driver):
        time.sleep(POLL_S)
        polls += 1
        if polls < 120 or polls % 4 == 0:  # often while Ray starts its agents, then every 2 s
            current = session_processes(session_dir, exclude=driver)
            known = {p: t for p, t in known.items() if _same_alive(p, t)}
            known.update({p: start_time(p) for p in current if p not in known})
            if polls >= 20 and not current:
                _end_orphans(session_dir, known)
                _log(session_dir, "the session has no process left: done")
                return  # the driver shut its Ray down cleanly: nothing more to watch
    _log(session_dir, f"driver {driver} is gone: ending {sorted(known)}")
    left = end_session(session_dir, _still(known))
    _log(session_dir, f"{left} processes left")


def _still(known: dict[int, str | None]) -> set[int]:
    """The remembered processes still alive (the same processes: pid and start time); one read each."""
    return {p for p, t in known.items() if _same_alive(p, t)}


def _end_orphans(session_dir: str, known: dict[int, str | None]) -> None:
    """End the remembered processes a clean shutdown left behind, once they had ``GRACE_S`` to exit."""
    deadline = time.time() + GRACE_S
    while time.time() < deadline and _still(known):
        time.sleep(0.1)
    if orphans := _still(known):
        _log(session_dir, f"clean shutdown left {sorted(orphans)} running: ending them")
        _log(session_dir, f"{end_session(session_dir, orphans)} processes left")


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to the terminal is for the driver
    watch(int(sys.argv[1]), sys.argv[2])
