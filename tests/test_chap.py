"""CHAP, mutual CHAP and initiator ACLs (RFC 7143 §12.1.3, RFC 1994): the
sans-IO exchange, the login state machine driving it, and real initiators
(libiscsi tools, qemu-img) against a target that requires them."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.auth import (
    Access,
    AuthConfigError,
    ChapAuthenticator,
    ChapCredentials,
    ChapExchange,
    chap_response,
    decode_binary,
)
from edge.iscsi_session import LoginFailed, State
from steelfusion.iscsi.pdu import LoginResponse
from steelfusion.iscsi.text import decode_text, encode_text
from tests.conftest import tool
from tests.iscsi_helpers import INITIATOR, IQN, LIBISCSI_KEYS, OTHER_IQN, Initiator
from tests.nodes import wait_for

SECRET = b"initiator-secret-1"
TSECRET = b"target-secret-22"
ALICE = ChapCredentials("alice", SECRET)
TARGET = ChapCredentials("tgt", TSECRET)


def fixed_token(n: int) -> bytes:
    return bytes(range(1, n + 1))


def exchange(access: Access | None = None) -> ChapExchange:
    return ChapExchange(access or Access(chap=ALICE, mutual=TARGET), INITIATOR,
                        token=fixed_token)


def offer(x: ChapExchange, algs: str = "5") -> tuple[int, int, bytes]:
    keys, ok = x.step("CHAP", {"CHAP_A": algs})
    assert ok is None
    d = dict(keys)
    return int(d["CHAP_A"]), int(d["CHAP_I"]), bytes.fromhex(d["CHAP_C"][2:])


# --------------------------------------------------------------------------- the exchange


@pytest.mark.parametrize("algs,chosen", [("5", 5), ("7,5", 7), ("99, 6", 6), ("8", 8)])
def test_chap_one_way(algs: str, chosen: int) -> None:
    x = exchange()
    a, i, c = offer(x, algs)
    assert a == chosen and len(c) == 32
    r = chap_response(a, i, SECRET, c)
    keys, ok = x.step("CHAP", {"CHAP_N": "alice", "CHAP_R": "0x" + r.hex()})
    assert ok is True and keys == [] and not x.mutual


def test_chap_response_is_rfc1994_md5() -> None:
    assert chap_response(5, 7, b"secret", b"\x01\x02") == \
        hashlib.md5(b"\x07secret\x01\x02").digest()


def test_chap_base64_response_and_mutual() -> None:
    x = exchange()
    a, i, c = offer(x)
    r = base64.b64encode(chap_response(a, i, SECRET, c)).decode()
    mine = os.urandom(16)
    keys, ok = x.step("CHAP", {"CHAP_N": "alice", "CHAP_R": "0b" + r, "CHAP_I": "9",
                               "CHAP_C": "0x" + mine.hex()})
    assert ok is True and x.mutual
    d = dict(keys)
    assert d["CHAP_N"] == "tgt"
    assert bytes.fromhex(d["CHAP_R"][2:]) == chap_response(a, 9, TSECRET, mine)


@pytest.mark.parametrize("keys,reason", [
    ({"CHAP_N": "mallory"}, "mismatch"),
    ({"CHAP_R": "0x" + "00" * 16}, "mismatch"),
    ({"CHAP_R": "zz"}, "mismatch"),
    ({"CHAP_N": None}, "missing"),
    ({"CHAP_I": "1"}, "CHAP_I"),
    ({"CHAP_I": "300", "CHAP_C": "0x" + "ab" * 16}, "CHAP_I"),
    ({"CHAP_I": "1", "CHAP_C": "0x0102"}, "too short"),
    ({"CHAP_I": "1", "CHAP_C": "0x" + fixed_token(32).hex()}, "reflects"),
])
def test_chap_refusals(keys: dict[str, str | None], reason: str) -> None:
    x = exchange()
    a, i, c = offer(x)
    msg = {"CHAP_N": "alice", "CHAP_R": "0x" + chap_response(a, i, SECRET, c).hex()}
    msg.update({k: v for k, v in keys.items() if v is not None})
    for k, v in keys.items():
        if v is None:
            del msg[k]
    answer, ok = x.step("CHAP", msg)  # type: ignore[arg-type]
    assert ok is False and answer == [] and reason in x.reason
    assert SECRET.decode() not in x.reason and "0x" not in x.reason
    assert x.step("CHAP", msg)[1] is False  # nothing after the end  # type: ignore[arg-type]


def test_chap_refusals_before_the_response() -> None:
    x = exchange()
    assert x.step("CHAP", {"CHAP_A": "1,2"}) == ([("CHAP_A", "Reject")], False)
    x = exchange()
    assert x.step("CHAP", {"CHAP_A": "5", "CHAP_N": "alice"})[1] is False
    assert exchange().step("SRP", {"CHAP_A": "5"})[1] is False
    assert exchange().step("CHAP", {}) == ([], None)  # AuthMethod-only round
    no_mutual = exchange(Access(chap=ALICE))
    a, i, c = offer(no_mutual)
    _, ok = no_mutual.step("CHAP", {"CHAP_N": "alice",
                                    "CHAP_R": "0x" + chap_response(a, i, SECRET, c).hex(),
                                    "CHAP_I": "1", "CHAP_C": "0x" + "ab" * 16})
    assert ok is False and "mutual" in no_mutual.reason


def test_credentials_rules() -> None:
    with pytest.raises(AuthConfigError):
        ChapCredentials("u", b"short")
    with pytest.raises(AuthConfigError):
        ChapCredentials.of("u", None)
    assert ChapCredentials.of(None, None) is None
    with pytest.raises(AuthConfigError, match="differ"):
        Access(chap=ALICE, mutual=ChapCredentials("t", SECRET))
    assert SECRET.decode() not in repr(ALICE) and SECRET.decode() not in repr(Access(ALICE))
    assert decode_binary("0x0") == b"\0" and decode_binary("0xzz") is None
    assert decode_binary("0b!!") is None and decode_binary("plain") is None


def test_authenticator_acl_and_credentials() -> None:
    bob = ChapCredentials("bob", b"bob-own-secret")
    auth = ChapAuthenticator(
        {IQN: Access(chap=ALICE, initiators=frozenset({INITIATOR, "iqn.b"}),
                     per_initiator={"iqn.b": bob}),
         "iqn.open": Access()},
        discovery=Access(chap=ALICE))
    assert auth.authorize(INITIATOR, IQN) and not auth.authorize("iqn.eve", IQN)
    assert auth.authorize("iqn.eve", "iqn.open") and auth.authorize("iqn.eve", "iqn.unknown")
    assert auth.visible("iqn.eve", [IQN, "iqn.open"]) == ["iqn.open"]
    assert auth.begin("iqn.eve", "iqn.open") is None
    x = auth.begin("iqn.b", IQN)
    assert x is not None and x.access.credentials_for("iqn.b") is bob
    assert auth.begin(INITIATOR, None) is not None  # discovery CHAP


# --------------------------------------------------------------------------- the login state machine


def chap_login(ini: Initiator, secret: bytes, *, mutual: bytes | None = None,
               discovery: bool = False) -> tuple[LoginResponse, dict[str, str]]:
    base = [("InitiatorName", INITIATOR)]
    base += [("SessionType", "Discovery")] if discovery else [("TargetName", IQN)]
    r = ini.login_step([*base, ("AuthMethod", "CHAP,None")])
    assert not r.transit
    assert dict(decode_text(r.data))["AuthMethod"] == "CHAP"
    d = dict(decode_text(ini.login_step([("CHAP_A", "5")]).data))
    resp = chap_response(5, int(d["CHAP_I"]), secret, bytes.fromhex(d["CHAP_C"][2:]))
    keys = [("CHAP_N", "alice"), ("CHAP_R", "0x" + resp.hex())]
    if mutual is not None:
        keys += [("CHAP_I", "3"), ("CHAP_C", "0x" + mutual.hex())]
    r = ini.login_step(keys)
    return r, dict(decode_text(r.data))


def test_session_chap_then_full_feature() -> None:
    auth = ChapAuthenticator({IQN: Access(chap=ALICE, mutual=TARGET)})
    ini = Initiator(authenticator=auth)
    challenge = os.urandom(16)
    r, keys = chap_login(ini, SECRET, mutual=challenge)
    assert r.status_class == 0 and r.transit and r.nsg == 1
    assert keys["CHAP_R"] == "0x" + chap_response(5, 3, TSECRET, challenge).hex()
    r = ini.login_step(LIBISCSI_KEYS, csg=1, nsg=3)
    assert r.transit and r.status_class == 0
    assert ini.conn.state is State.FULL_FEATURE


def test_session_wrong_secret_is_0201_and_logs_no_secret() -> None:
    ini = Initiator(authenticator=ChapAuthenticator({IQN: Access(chap=ALICE)}))
    r, _ = chap_login(ini, b"not-the-secret!")
    assert (r.status_class, r.status_detail) == (2, 1) and ini.conn.state is State.CLOSED
    (f,) = [e for e in ini.events if isinstance(e, LoginFailed)]
    assert f.status == 0x0201 and "mismatch" in f.reason
    assert SECRET.decode() not in repr(ini.events)


def test_session_discovery_chap_and_acl_filtered_send_targets() -> None:
    auth = ChapAuthenticator({IQN: Access(initiators=frozenset({"iqn.someone-else"}))},
                             discovery=Access(chap=ALICE))
    ini = Initiator(authenticator=auth)
    r, _ = chap_login(ini, SECRET, discovery=True)
    assert r.status_class == 0
    ini.login_step([("HeaderDigest", "None")], csg=1, nsg=3)
    from steelfusion.iscsi.pdu import TextRequest, TextResponse
    ini.send(TextRequest(itt=9, cmdsn=1, data=encode_text([("SendTargets", "All")])))
    (t,) = ini.recv()
    assert isinstance(t, TextResponse)
    names = [v for k, v in decode_text(t.data) if k == "TargetName"]
    assert IQN not in names and OTHER_IQN in names


# --------------------------------------------------------------------------- real initiators

CHAP_IQN = "iqn.2024-01.io.steelfusion:chap"
INQ = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-inq"
LS = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-ls"
USER, PASSWORD = "alice", "alice-password-1"
TUSER, TPASSWORD = "edge", "edge-password-22"
QEMU_INITIATOR = "iqn.2008-11.org.linux-kvm"


class Standalone:
    def __init__(self, proc: subprocess.Popen[str], port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log

    def url(self, creds: str = "", opts: str = "") -> str:
        return f"iscsi://{creds}127.0.0.1:{self.port}/{CHAP_IQN}/0{opts}"


@pytest.fixture(scope="module")
def chap_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Standalone]:
    tool("iscsi-inq")
    d = tmp_path_factory.mktemp("chap")
    log = d / "target.log"
    env = {**os.environ, "STEELFUSION_CHAP_SECRET": PASSWORD,
           "STEELFUSION_MUTUAL_SECRET": TPASSWORD,
           "STEELFUSION_DISCOVERY_CHAP_SECRET": PASSWORD}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge.target", "--file", str(d / "lun.img"), "--size", "16M",
         "--host", "127.0.0.1", "--port", "0", "--iqn", CHAP_IQN, "--chap-user", USER,
         "--mutual-user", TUSER, "--discovery-chap-user", USER, "--initiator", INQ,
         "--initiator", LS, "--initiator", QEMU_INITIATOR, "--log-file", str(log)],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    assert proc.stderr is not None
    line = ""
    deadline = time.monotonic() + 20
    while "iscsi://" not in line and time.monotonic() < deadline:
        line = proc.stderr.readline()
    assert "iscsi://" in line, "target did not start"
    port = int(line.split("iscsi://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    try:
        yield Standalone(proc, port, log)
    finally:
        proc.terminate()
        proc.wait(10)
    text = log.read_text()
    for secret in (PASSWORD, TPASSWORD):
        assert secret not in text, "a CHAP secret reached the log"


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool(argv[0]), *argv[1:]], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})}, check=False)


CREDS = {"LIBISCSI_CHAP_USERNAME": USER, "LIBISCSI_CHAP_PASSWORD": PASSWORD}


@pytest.mark.initiator
@pytest.mark.lab
def test_libiscsi_chap_login(chap_target: Standalone) -> None:
    r = run("iscsi-inq", chap_target.url(), env=CREDS)
    assert r.returncode == 0 and "DIRECT_ACCESS" in r.stdout, r.stderr
    r = run("iscsi-inq", chap_target.url(f"{USER}%{PASSWORD}@"))
    assert r.returncode == 0, r.stderr
    r = run("iscsi-inq", chap_target.url(opts="?header_digest=crc32c"), env=CREDS)
    assert r.returncode == 0, r.stderr


@pytest.mark.initiator
@pytest.mark.lab
def test_libiscsi_mutual_chap(chap_target: Standalone) -> None:
    env = {**CREDS, "LIBISCSI_CHAP_TARGET_USERNAME": TUSER,
           "LIBISCSI_CHAP_TARGET_PASSWORD": TPASSWORD}
    r = run("iscsi-inq", chap_target.url(), env=env)
    assert r.returncode == 0 and "DIRECT_ACCESS" in r.stdout, r.stderr
    env["LIBISCSI_CHAP_TARGET_PASSWORD"] = "not-what-the-edge-has"
    r = run("iscsi-inq", chap_target.url(), env=env)
    assert "Invalid CHAP_R" in r.stderr  # the initiator refuses an impostor target


@pytest.mark.initiator
@pytest.mark.lab
def test_wrong_password_and_no_password_refused(chap_target: Standalone) -> None:
    r = run("iscsi-inq", chap_target.url(),
            env={"LIBISCSI_CHAP_USERNAME": USER, "LIBISCSI_CHAP_PASSWORD": "wrong-password-9"})
    assert r.returncode != 0 and "Authentication failure" in r.stderr
    r = run("iscsi-inq", chap_target.url())
    assert r.returncode != 0 and "Authentication failure" in r.stderr
    wait_for(lambda: all(w in chap_target.log.read_text()
                         for w in ("iscsi_login_failed", "CHAP name or response mismatch")),
             10, what="the refused logins in the target's log")


@pytest.mark.initiator
@pytest.mark.lab
def test_initiator_not_on_the_acl_refused(chap_target: Standalone) -> None:
    r = run("iscsi-readcapacity16", chap_target.url(), env=CREDS)
    assert r.returncode != 0 and "Authorization failure" in r.stderr
    wait_for(lambda: "initiator not on the access list" in chap_target.log.read_text(), 10,
             what="the refusal in the target's log")


@pytest.mark.initiator
@pytest.mark.lab
def test_iscsi_ls_discovery_with_chap(chap_target: Standalone) -> None:
    r = run("iscsi-ls", "-s", f"iscsi://127.0.0.1:{chap_target.port}", env=CREDS)
    assert r.returncode == 0 and CHAP_IQN in r.stdout and "Lun:0" in r.stdout, r.stderr
    r = run("iscsi-ls", f"iscsi://127.0.0.1:{chap_target.port}")
    assert CHAP_IQN not in r.stdout


@pytest.mark.initiator
@pytest.mark.lab
def test_qemu_img_with_chap(chap_target: Standalone, tmp_path: Path) -> None:
    tool("qemu-img")
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(1 << 20))
    url = chap_target.url(f"{USER}%{PASSWORD}@")
    opts = ["--image-opts", f"driver=iscsi,transport=tcp,portal=127.0.0.1:{chap_target.port},"
            f"target={CHAP_IQN},lun=0,user={USER},password-secret=sec0,header-digest=crc32c"]
    r = run("qemu-img", "info", url)
    assert r.returncode == 0 and "16 MiB" in r.stdout, r.stderr
    r = run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), url)
    assert r.returncode == 0, r.stderr
    back = tmp_path / "back.raw"
    r = run("qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(back))
    assert r.returncode == 0, r.stderr
    assert back.read_bytes()[:1 << 20] == src.read_bytes()
    r = run("qemu-img", "info", "--object", f"secret,id=sec0,data={PASSWORD}", *opts)
    assert r.returncode == 0, r.stderr

    def logins() -> list[str]:
        return [line for line in chap_target.log.read_text().splitlines()
                if '"iscsi_login"' in line and QEMU_INITIATOR in line]

    wait_for(lambda: any('"header_digest": true' in line for line in logins()),  # CHAP + CRC32C
             10, what="qemu-img's login with CHAP and a CRC32C header digest in the log")
    r = run("qemu-img", "info", chap_target.url(f"{USER}%wrong-password-9@"))
    assert r.returncode != 0


# --------------------------------------------------------------------------- a lab Edge

LIBISCSI_TEST = ("iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test",
                 "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2")


@pytest.mark.lab
@pytest.mark.initiator
@pytest.mark.timeout(180)
def test_lab_edge_with_chap_and_acl(tmp_path: Path) -> None:
    """An Edge configured through Lab.up with CHAP, mutual CHAP and an ACL:
    libiscsi's conformance initiators (both names) log in with CHAP, others
    are refused, and the secrets stay in the 0600 node config only."""
    from steelfusion.iscsi import conformance
    from steelfusion.lab import Lab

    tool("iscsi-test-cu")
    lab = Lab(tmp_path / "lab")
    try:
        data = lab.up(luns=1, lun_size=16 << 20, edges=1, chap=(USER, PASSWORD),
                      mutual_chap=(TUSER, TPASSWORD), initiators=[*LIBISCSI_TEST, INQ])
        edge = data["edges"][0]
        url = edge["targets"][0]["url"]
        cfg = Path(edge["config"])
        assert cfg.stat().st_mode & 0o777 == 0o600 and PASSWORD in cfg.read_text()
        assert PASSWORD not in lab.file.read_text()
        assert run("iscsi-inq", url, env=CREDS).returncode == 0
        assert run("iscsi-inq", url).returncode != 0
        assert run("iscsi-readcapacity16", url, env=CREDS).returncode != 0  # not on the ACL
        env = {**CREDS, "LIBISCSI_CHAP_TARGET_USERNAME": TUSER,
               "LIBISCSI_CHAP_TARGET_PASSWORD": TPASSWORD}
        tally, text = conformance.run(
            [url, url], tests="ALL.Inquiry.*,ALL.Reserve6.2Initiators,ALL.MultipathIO.Simple",
            env=env, timeout=120, cwd=str(tmp_path))
        assert tally.total == 9 and tally.clean == 9, text[-2000:]
    finally:
        if lab.file.exists():
            lab.down()
    log = Path(edge["log"]).read_text()
    assert "iscsi_login_failed" in log
    assert PASSWORD not in log and TPASSWORD not in log


# --------------------------------------------------------------------------- configuration

EDGE_TOML = """
[edge]
name = "edge-1"
portal = "127.0.0.1:3260"
control = "127.0.0.1:7001"
blockstore = "/tmp/bs"
cores = ["127.0.0.1:7000"]
discovery_chap_user = "disc"
discovery_chap_secret = "discovery-secret"

[[target]]
iqn = "iqn.2024-01.io.steelfusion:edge-1"
chap_user = "alice"
chap_secret = "alice-password-1"
mutual_user = "edge"
mutual_secret = "edge-password-22"
initiators = ["iqn.a", "iqn.b"]
{extra}
[[target.lun]]
lun = 0
lun_id = 1
size = "16M"

[[target.initiator]]
name = "iqn.b"
chap_user = "bob"
chap_secret = "bob-password-333"
"""


def test_edge_config_chap_acl_round_trip(tmp_path: Path) -> None:
    from edge.auth import from_edge_config
    from steelfusion.config import EdgeConfig, write_toml

    path = tmp_path / "edge.toml"
    path.write_text(EDGE_TOML.format(extra=""))
    cfg = EdgeConfig.load(path)
    t = cfg.targets[0]
    assert t.chap_user == "alice" and t.initiators == ("iqn.a", "iqn.b")
    assert t.initiator_chap[0].name == "iqn.b" and cfg.discovery_chap_user == "disc"
    for secret in ("alice-password-1", "edge-password-22", "bob-password-333",
                   "discovery-secret"):
        assert secret not in repr(cfg)
    out = tmp_path / "again.toml"
    write_toml(out, cfg.to_dict())
    assert out.stat().st_mode & 0o777 == 0o600
    again = EdgeConfig.load(out)
    assert again.targets == cfg.targets
    assert again.discovery_chap_secret == cfg.discovery_chap_secret
    auth = from_edge_config(cfg)
    assert auth is not None
    assert auth.authorize("iqn.a", t.iqn) and not auth.authorize("iqn.c", t.iqn)
    x = auth.begin("iqn.b", t.iqn)
    assert x is not None and x.access.credentials_for("iqn.b").user == "bob"
    assert auth.begin("iqn.x", None) is not None  # discovery CHAP


def test_edge_config_rejects_bad_chap(tmp_path: Path) -> None:
    """Short secrets, a mutual secret equal to an initiator's, half-set
    pairs: refused, and the message never repeats the secret."""
    from steelfusion.config import ConfigError, EdgeConfig

    bad = [
        EDGE_TOML.format(extra="").replace('chap_secret = "alice-password-1"',
                                           'chap_secret = "short"'),
        EDGE_TOML.format(extra="").replace('mutual_secret = "edge-password-22"',
                                           'mutual_secret = "alice-password-1"'),
        EDGE_TOML.format(extra="").replace('mutual_user = "edge"\n', ''),
        EDGE_TOML.format(extra="").replace('chap_user = "bob"\n', ''),
    ]
    for i, text in enumerate(bad):
        path = tmp_path / f"bad{i}.toml"
        path.write_text(text)
        with pytest.raises(ConfigError) as e:
            EdgeConfig.load(path)
        assert "alice-password-1" not in str(e.value) and "short" not in str(e.value)
