"""Unit tests for peer credentials and access rules, against the real user database."""

from __future__ import annotations

import grp
import os
import pwd
import socket

import pytest

from edged.api.access import Peer, Rule
from edged.errors import EdgedError

ROOT = pwd.getpwnam("root")
NOBODY = pwd.getpwnam("nobody")


def peer_of(user: pwd.struct_passwd, gid: int | None = None) -> Peer:
    return Peer(pid=12345, uid=user.pw_uid, gid=user.pw_gid if gid is None else gid)


def unused_id(taken) -> int:
    """An id that no user or group has."""
    candidate = 54321
    while candidate in taken:
        candidate += 1
    return candidate


def user_with_supplementary_group() -> tuple[pwd.struct_passwd, grp.struct_group]:
    """A real user listed as a member of a group that is not its primary group."""
    for group in grp.getgrall():
        for member in group.gr_mem:
            try:
                user = pwd.getpwnam(member)
            except KeyError:
                continue
            if user.pw_gid != group.gr_gid:
                return user, group
    pytest.skip("no user on this system has a supplementary group in /etc/group")


# --- Rule.build --------------------------------------------------------------------------
def test_build_resolves_names() -> None:
    nogroup = grp.getgrgid(NOBODY.pw_gid)
    rule = Rule.build(["root", "nobody"], [nogroup.gr_name], "socket")
    assert rule.uids == frozenset({0, NOBODY.pw_uid})
    assert rule.gids == frozenset({NOBODY.pw_gid})


def test_build_takes_numeric_ids_as_they_are() -> None:
    rule = Rule.build(["0", "65534", "424242"], ["0", "999999"], "socket")
    assert rule.uids == frozenset({0, 65534, 424242})
    assert rule.gids == frozenset({0, 999999})


def test_build_with_nothing_is_the_empty_rule() -> None:
    rule = Rule.build([], [], "socket")
    assert rule == Rule()
    assert not rule.uids and not rule.gids


@pytest.mark.parametrize("user", ["no-such-user-edged", "-1", "root ", "", "1e3"])
def test_an_unknown_user_names_the_config_field(user: str) -> None:
    with pytest.raises(EdgedError) as info:
        Rule.build(["root", user], [], "socket")
    assert str(info.value) == f"socket.allowed_users: no such user or group {user!r}"


def test_an_unknown_group_names_the_config_field_of_the_model() -> None:
    with pytest.raises(EdgedError) as info:
        Rule.build(["root"], ["no-such-group-edged"], "models.face")
    assert str(info.value) == "models.face.allowed_groups: no such user or group 'no-such-group-edged'"


def test_a_user_name_is_not_taken_as_a_group() -> None:
    name = next((u.pw_name for u in pwd.getpwall() if not _group_exists(u.pw_name)), None)
    if name is None:
        pytest.skip("every user here has a group of the same name")
    with pytest.raises(EdgedError, match="allowed_groups"):
        Rule.build([], [name], "socket")


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


# --- Rule.allows -------------------------------------------------------------------------
def test_the_empty_rule_allows_everyone() -> None:
    rule = Rule()
    assert rule.allows(peer_of(ROOT))
    assert rule.allows(peer_of(NOBODY))
    assert rule.allows(Peer(pid=1, uid=unused_id({u.pw_uid for u in pwd.getpwall()}), gid=424242))


def test_allows_by_uid() -> None:
    rule = Rule.build(["root"], [], "socket")
    assert rule.allows(peer_of(ROOT))
    assert rule.allows(peer_of(ROOT, gid=NOBODY.pw_gid))  # the uid alone is enough
    assert not rule.allows(peer_of(NOBODY))


def test_allows_by_numeric_uid() -> None:
    rule = Rule.build([str(NOBODY.pw_uid)], [], "socket")
    assert rule.allows(peer_of(NOBODY))
    assert not rule.allows(peer_of(ROOT))


def test_allows_by_primary_gid() -> None:
    nogroup = grp.getgrgid(NOBODY.pw_gid)
    rule = Rule.build([], [nogroup.gr_name], "socket")
    assert rule.allows(peer_of(NOBODY))
    assert not rule.allows(peer_of(ROOT))


def test_allows_by_the_peers_gid_even_for_an_unknown_uid() -> None:
    uid = unused_id({u.pw_uid for u in pwd.getpwall()})
    peer = Peer(pid=1, uid=uid, gid=4242)
    assert peer.groups == frozenset({4242})
    assert Rule(gids=frozenset({4242})).allows(peer)
    assert not Rule(gids=frozenset({4243})).allows(peer)
    assert not Rule(uids=frozenset({0})).allows(peer)


def test_allows_by_supplementary_group() -> None:
    user, group = user_with_supplementary_group()
    peer = peer_of(user)
    assert group.gr_gid != peer.gid
    assert group.gr_gid in peer.groups
    assert user.pw_gid in peer.groups
    assert Rule.build([], [group.gr_name], "socket").allows(peer)
    assert Rule.build([], [str(group.gr_gid)], "socket").allows(peer)
    unrelated = unused_id(peer.groups | {g.gr_gid for g in grp.getgrall()})
    assert not Rule(gids=frozenset({unrelated})).allows(peer)


def test_groups_of_a_known_user_match_the_system() -> None:
    peer = peer_of(ROOT)
    assert peer.groups == frozenset(os.getgrouplist("root", ROOT.pw_gid))
    assert ROOT.pw_gid in peer.groups


def test_a_rule_with_users_and_groups_allows_either() -> None:
    nogroup = grp.getgrgid(NOBODY.pw_gid)
    rule = Rule.build(["root"], [nogroup.gr_name], "socket")
    assert rule.allows(peer_of(ROOT))
    assert rule.allows(peer_of(NOBODY))
    stranger = Peer(pid=1, uid=unused_id({u.pw_uid for u in pwd.getpwall()}), gid=unused_id(
        {g.gr_gid for g in grp.getgrall()}))
    assert not rule.allows(stranger)


# --- Peer.of -----------------------------------------------------------------------------
def test_peer_of_a_real_socketpair_is_this_process() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        for sock in (a, b):
            peer = Peer.of(sock)
            assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())
            assert peer.supplementary == frozenset(os.getgroups())
            assert os.getgid() in peer.groups


def test_peer_of_a_listening_socket_connection(short_dir) -> None:
    path = str(short_dir / "s")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)
            conn, _ = server.accept()
            with conn:
                peer = Peer.of(conn)
                assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())
                assert Rule.build([str(os.getuid())], [], "socket").allows(Peer.of(conn))


@pytest.mark.skipif(os.geteuid() != 0, reason="setting another process's groups needs root")
def test_groups_come_from_the_peer_process_not_the_group_database(short_dir) -> None:
    """A process that dropped its supplementary groups is not in them any more."""
    import subprocess
    import sys

    path = str(short_dir / "g")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)
        code = f"import socket,time; s=socket.socket(socket.AF_UNIX); s.connect({path!r}); time.sleep(2)"
        child = subprocess.Popen([sys.executable, "-c", code], extra_groups=[4242])
        conn, _ = server.accept()
        with conn:
            peer = Peer.of(conn)
        child.wait()
    assert peer.supplementary == frozenset({4242})
    assert Rule(gids=frozenset({4242})).allows(peer)
    assert not Rule(gids=frozenset({0})).allows(Peer(peer.pid, 65534, 65534, frozenset({4242})))
