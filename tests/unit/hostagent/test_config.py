"""Agent options: defaults, bounds, a config file, and the committed sample kept current."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
from oslo_config import cfg

from hostagent.config import list_opts, make_conf

ROOT = Path(__file__).resolve().parents[3]
SAMPLE = ROOT / "etc" / "qsnap" / "qsnap.conf.sample"


def test_defaults_work_on_one_machine() -> None:
    conf = make_conf()
    assert conf.host == socket.gethostname()
    assert conf.state_path == "/var/lib/qsnap"
    assert conf.libvirt.uri == "qemu:///system"
    assert conf.agent.workers == 4
    assert conf.cinder.auth_type == "none"
    # oslo.messaging's and oslo.log's options are registered on the private ConfigOpts,
    # including the tracing group that otherwise breaks every call() (testbed.md).
    assert conf.oslo_messaging_tracing.tracing_enabled is False
    assert conf.oslo_messaging_metrics.metrics_enabled is False
    assert conf.debug is False


def test_config_file_values(tmp_path: Path) -> None:
    path = tmp_path / "qsnap.conf"
    path.write_text(
        "[DEFAULT]\nhost = compute-7\ntransport_url = rabbit://u:p@mq:5672/\n"
        "[agent]\nworkers = 8\nmerge_timeout = 30\n"
        "[shares]\nallowed_roots = /srv/a,/srv/b\n"
        "[cinder]\nauth_type = noauth\nendpoint = http://c:8776/v3\nproject_id = abc\n"
    )
    conf = make_conf(config_files=[str(path)])
    assert conf.host == "compute-7"
    assert conf.transport_url == "rabbit://u:p@mq:5672/"
    assert (conf.agent.workers, conf.agent.merge_timeout) == (8, 30.0)
    assert conf.shares.allowed_roots == ["/srv/a", "/srv/b"]
    assert (conf.cinder.auth_type, conf.cinder.project_id) == ("noauth", "abc")


@pytest.mark.parametrize(
    "body",
    ["[agent]\nworkers = 0\n", "[agent]\nworkers = 1000\n", "[cinder]\nauth_type = magic\n"],
)
def test_out_of_range_values_are_refused(tmp_path: Path, body: str) -> None:
    path = tmp_path / "bad.conf"
    path.write_text(body)
    conf = make_conf(config_files=[str(path)])
    group = conf.agent if "agent" in body else conf.cinder
    with pytest.raises(cfg.ConfigFileValueError):
        _ = group.workers if "agent" in body else group.auth_type


def test_list_opts_covers_every_group() -> None:
    groups = {group for group, _ in list_opts()}
    assert groups == {None, "libvirt", "agent", "shares", "cinder", "nova", "backup", "journal"}
    names = {opt.dest for _, opts in list_opts() for opt in opts}
    assert {"host", "state_path", "uri", "workers", "allowed_roots", "auth_type"} <= names
    assert {"repository", "max_parallel", "keep_last", "zstd_level"} <= names


def test_password_is_secret() -> None:
    opts = dict(list_opts())["cinder"]
    assert next(o for o in opts if o.dest == "password").secret


def test_committed_sample_is_current(tmp_path: Path) -> None:
    """tools/gen_config_sample.sh regenerates exactly the committed sample."""
    out = tmp_path / "qsnap.conf.sample"
    res = subprocess.run(
        [str(ROOT / "tools" / "gen_config_sample.sh"), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert out.read_text() == SAMPLE.read_text(), "run tools/gen_config_sample.sh and commit"
    assert "#host = <hostname>" in out.read_text()  # not this machine's name
    assert "[cinder]" in out.read_text() and "#transport_url = rabbit://" in out.read_text()
