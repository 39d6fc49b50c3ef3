"""The actor-readiness wait shared by the PRM pool and the policy replicas, on a fake Ray."""
from types import SimpleNamespace

import pytest

from ttc_vllm.ray_actors import first_line, wait_ready


class GetTimeoutError(Exception):
    pass


def fake_ray(failure):
    def get(refs, timeout):
        assert len(refs) == 2 and timeout == 7
        if failure is not None:
            raise failure
    return SimpleNamespace(get=get, exceptions=SimpleNamespace(GetTimeoutError=GetTimeoutError))


class Handle:
    ready = SimpleNamespace(remote=lambda: "ref")


class Down(Exception):
    pass


@pytest.mark.parametrize("failure,message", [
    (GetTimeoutError("slow"), "workers not ready after 7s (not enough resources for 2 of them with {'num_cpus': 4}?)"),
    (RuntimeError("ActorDiedError\n  traceback...\n  ValueError: no such model  \n"),
     "workers failed to start: ValueError: no such model"),
])
def test_a_failed_start_releases_the_actors_and_names_the_cause(failure, message):
    released = []
    with pytest.raises(Down) as e:
        wait_ready(fake_ray(failure), [Handle(), Handle()], 7, "workers", Down,
                   lambda: released.append(True), hint=" with {'num_cpus': 4}")
    assert str(e.value) == message and released == [True]


def test_ready_actors_are_left_alone():
    released = []
    wait_ready(fake_ray(None), [Handle(), Handle()], 7, "workers", Down, lambda: released.append(True))
    assert released == []
    assert first_line(RuntimeError("")) == "RuntimeError"
