"""The driver's Ray cluster: attach to a running one within a deadline, or start a local one that
listens on 127.0.0.1 only.

    owned = init_ray(cfg)   # True when this process started the cluster (then ray.shutdown stops it)

Which cluster: ray.address, else RAY_ADDRESS, else the cluster `ray start` recorded on this machine
(<ray temp dir>/ray_current_cluster), else a new local one; ray.address=local always starts one.
- Attaching has a deadline (ray.connect_timeout_s): the address is probed first, and Ray's own
  retries are bounded by it, so a stale record or a head bound elsewhere ends in one line naming
  the address and what to do (`ray stop`, or ray.address=local), not minutes of retries.
- A local cluster binds loopback only: Ray swaps a node address of 127.0.0.1 for the machine's
  outward address (and its servers then listen on every interface) unless
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which keeps the node, and so its sockets, on 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import socket

from system.config import ConfigError

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": a local node stays on 127.0.0.1


def init_ray(cfg) -> bool:
    """Attach to the cluster this runs in, or start a local one sized for the config; True when
    this process started it. ConfigError("ray.address: ...") when the cluster cannot be reached."""
    import ray

    if ray.is_initialized():  # embedded use (tests, notebooks): keep the caller's cluster
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or ""
    # no runtime_env here: a submitted job's own runtime env would clash with it; the actors get
    # their environment from ActorGroup
    kwargs = {"log_to_driver": cfg.ray.log_to_driver}
    if address == "local":
        return _start_local(cfg, kwargs)
    if "://" in address:  # a job server or Ray Client URL (inside a submitted job): Ray's to resolve
        ray.init(address=address, **kwargs)
        return False
    source = "ray.address" if cfg.ray.address else "RAY_ADDRESS"
    if address in ("", "auto"):  # the cluster `ray start` recorded on this machine, if any
        from ray._private.utils import read_ray_address

        wanted, address = address, read_ray_address() or ""
        source = "recorded in ray_current_cluster by `ray start` on this machine"
        if not address and wanted == "auto":
            raise ConfigError("ray.address: auto, but no `ray start` cluster is recorded on this "
                              "machine: start one, give its host:port, or pass ray.address=local")
        if not address:
            return _start_local(cfg, kwargs)
    _attach(address, source, cfg.ray.connect_timeout_s, kwargs)
    return False


def _unreachable(address: str, source: str, timeout_s: float, reason: str) -> ConfigError:
    return ConfigError(
        f"ray.address: no Ray cluster answers at {address} ({source}) within {timeout_s:g}s "
        f"({reason}): if that cluster is gone, run `ray stop` (and unset RAY_ADDRESS); to start a "
        f"local cluster instead, pass ray.address=local")


def _attach(address: str, source: str, timeout_s: float, kwargs: dict) -> None:
    import ray

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"ray.address: {address!r} ({source}) is not host:port, 'local' or a URL")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise _unreachable(address, source, timeout_s, err.strerror or type(err).__name__) from None
    # the port answers; bound Ray's own retries (one a second) by the same deadline
    wait_key = "RAY_gcs_server_port_wait_time_s"
    before = os.environ.get(wait_key)
    os.environ[wait_key] = str(max(1, int(timeout_s)))
    try:
        ray.init(address=address, **kwargs)
    except Exception as err:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise _unreachable(address, source, timeout_s, first) from None
    finally:
        if before is None:
            os.environ.pop(wait_key, None)
        else:
            os.environ[wait_key] = before


def _start_local(cfg, kwargs: dict) -> bool:
    import ray
    from ray._private import ray_constants

    from system.resources import required_resources

    # Ray's notice that a new local cluster uses token authentication, on every run: the cluster
    # is this run's own, on loopback only; clusters started with `ray start` still say it
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    os.environ[LOOPBACK_ENV] = "0"  # read by the processes the cluster starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # and by this one, whose Ray module is already loaded
    need = required_resources(cfg)
    # no idle workers started with the cluster: the actors run with their own environment
    # (ActorGroup's runtime_env), so Ray starts new processes for them and those would only take
    # CPU from the start-up (~0.7 CPU-s on the debug config)
    ray.init(num_cpus=max(os.cpu_count() or 1, int(need.get("CPU", 0) + 0.999)),
             include_dashboard=False, _node_ip_address="127.0.0.1",
             _system_config={"prestart_worker_first_driver": False}, **kwargs)
    return True
