"""The artifact under real Ray Serve: ``ray start`` / ``serve start`` / ``serve run config.yaml`` on the extracted
artifact (what AWS's Ray Serve container runs), next to the light local host serving the same artifact.

One Ray cluster for the module (its cold start is ~20-30 s). ray[serve] is a dev requirement: without it the
Ray endpoint fails to start and these tests fail, they do not skip. Both endpoints start with no package index
reachable (``PIP_NO_INDEX``, no pip configuration), as an endpoint under network isolation would.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from _http import exchange
from _serving import HOSTILE_REQUESTS, JPEG, VALID_REQUESTS, encode, image, make_artifact, package_for

from pipelines.serving import endpoint
from pipelines.util import processes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, dict]]:
    folder = tmp_path_factory.mktemp("ray-serving")
    make_artifact(folder)
    package = package_for(folder / "model.tar.gz")
    workdir = folder / "workdir"
    started = time.monotonic()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PIP_NO_INDEX", "1")  # no package index: pip install -r code/requirements.txt must still pass
        patch.setenv("PIP_CONFIG_FILE", os.devnull)
        patch.setenv("PIP_FIND_LINKS", "")
        records = {
            "ray": endpoint.deploy(workdir, "ray-host", package, port=0, ray=True),
            "light": endpoint.deploy(workdir, "light-host", package, port=0),
        }
    print(f"\nendpoints up in {time.monotonic() - started:.1f} s")
    yield records
    for name in ("ray-host", "light-host"):
        endpoint.stop(workdir, name)


def _both(hosts: dict, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> list:
    return [exchange(hosts[name]["url"], method, path, body, headers) for name in ("light", "ray")]


def test_ping_is_green_once_the_app_has_loaded_the_model(hosts) -> None:
    for record in hosts.values():
        status, _, body = exchange(record["url"], "GET", "/ping")
        assert status == 200 and json.loads(body)["status"] == "Healthy"
    assert "[ray host] pip install -r code/requirements.txt" in Path(hosts["ray"]["log"]).read_text()


@pytest.mark.parametrize("content_type", list(VALID_REQUESTS))
def test_one_image_per_content_type_byte_identical_on_both_hosts(hosts, content_type: str) -> None:
    body, media_type = VALID_REQUESTS[content_type]
    light, ray = _both(hosts, "POST", "/invocations", body, {"Content-Type": media_type})
    assert light[0] == 200 and json.loads(light[2])["predictions"]
    assert ray == light


@pytest.mark.parametrize("case", list(HOSTILE_REQUESTS))
def test_hostile_requests_are_refused_alike_and_a_valid_request_follows(hosts, case: str) -> None:
    body, headers, status, code = HOSTILE_REQUESTS[case]
    light, ray = _both(hosts, "POST", "/invocations", body, headers)
    assert ray == light
    assert (ray[0], json.loads(ray[2])["code"]) == (status, code)
    follow_light, follow_ray = _both(hosts, "POST", "/invocations", JPEG, {"Content-Type": "image/jpeg"})
    assert follow_ray[0] == 200 and follow_ray == follow_light


def test_the_servers_own_errors_are_the_same_on_both_hosts(hosts) -> None:
    for method, path in (("GET", "/nope"), ("GET", "/invocations"), ("DELETE", "/invocations")):
        light, ray = _both(hosts, method, path)
        assert ray == light and 400 <= ray[0] < 500 and set(json.loads(ray[2])) == {"error", "code"}


def test_a_burst_with_one_corrupt_image_fails_only_that_request_on_both_hosts(hosts) -> None:
    """Single-image requests at once: Ray's ``@serve.batch`` (and the light host's batcher) group them."""
    requests = [(encode(image(40 + 2 * i, 36, seed=200 + i), "PNG"), "image/png") for i in range(7)]
    requests.insert(3, (JPEG[: len(JPEG) // 2], "image/jpeg"))
    for name in ("light", "ray"):
        url = hosts[name]["url"]
        with ThreadPoolExecutor(len(requests)) as pool:
            replies = list(
                pool.map(lambda r: exchange(url, "POST", "/invocations", r[0], {"Content-Type": r[1]}), requests)
            )
        assert [reply[0] for reply in replies] == [200, 200, 200, 400, 200, 200, 200, 200], name
        assert json.loads(replies[3][2])["code"] == "truncated_image"
        assert len({reply[2] for reply in replies}) == len(requests)  # every request its own answer
        health = json.loads(exchange(url, "GET", "/ping")[2])
        assert (health["max_batch_size"], health["batch_wait_ms"]) == (8, 5.0), name  # the defaults, batching on


def test_the_replica_survived_every_request(hosts) -> None:
    record = hosts["ray"]
    assert endpoint.status(Path(record["log"]).parents[3], "ray-host")["EndpointStatus"] == "InService"
    log = Path(record["log"]).read_text()
    assert "replica ready" in log and log.count("replica ready") == 1  # never restarted
    assert "Traceback" not in log.split("replica ready", 1)[1]


def test_stopping_ends_every_process_the_ray_endpoint_started(hosts, tmp_path: Path) -> None:
    record = hosts["ray"]
    workdir = Path(record["log"]).parents[3]
    before = processes.session_members(record["pid"])
    assert len(before) > 5  # gcs, raylet, serve controller, proxy, replica, serve run...
    stopped = endpoint.stop(workdir, "ray-host")
    assert stopped is not None and not processes.session_members(record["pid"])
    assert not any(processes.is_alive(pid) for pid in before)
    assert endpoint.status(workdir, "ray-host") is None
    assert not endpoint.ping(record["url"], timeout=1)


def test_the_ray_clis_are_rays_own_even_when_another_serve_script_comes_first(tmp_path, monkeypatch) -> None:
    """sagemaker-pytorch-inference installs a `serve` script too; which one a fresh environment keeps depends on
    install order. The host runs Ray's entry points through this interpreter, so a `serve` on PATH is never used."""
    import subprocess
    import sys

    from pipelines.serving import ray_host

    impostor = tmp_path / "serve"
    impostor.write_text("#!/bin/sh\necho not ray serve\nexit 3\n")
    impostor.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    command = ray_host._tool("serve")
    assert command[0] == sys.executable
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "not ray serve" not in result.stdout
    assert {"run", "start", "shutdown"} <= set(result.stdout.split())  # Ray Serve's own subcommands
