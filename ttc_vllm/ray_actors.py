"""What the Ray actor groups (the PRM pool, the policy replicas) share: importing Ray
with a clear error, and waiting for freshly created actors to be ready."""
from __future__ import annotations

from collections.abc import Callable, Sequence


def import_ray(purpose: str, error: type[Exception] = ImportError):
    try:
        import ray
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise error(f"{purpose} needs Ray: pip install 'ttc-vllm[ray]'") from e
    return ray


def wait_ready(ray, handles: Sequence, timeout_s: float, what: str, error: type[Exception],
               on_failure: Callable[[], None], hint: str = "") -> None:
    """Block until every actor's `ready()` answered; else call `on_failure` (release the
    actors) and raise `error`: a timeout says resources are probably short, a failed
    constructor says why in one line."""
    try:
        ray.get([h.ready.remote() for h in handles], timeout=timeout_s)
    except Exception as e:
        on_failure()
        if isinstance(e, ray.exceptions.GetTimeoutError):
            raise error(f"{what} not ready after {timeout_s:g}s (not enough resources for "
                        f"{len(handles)} of them{hint}?)") from e
        raise error(f"{what} failed to start: {first_line(e)}") from e


def first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    # Ray wraps actor-constructor errors; the innermost line names the cause.
    return lines[-1].strip() if lines else type(e).__name__
