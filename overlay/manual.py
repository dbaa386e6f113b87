"""Each subcommand's manual page for `ipop-overlay COMMAND --help`."""

from __future__ import annotations

# Each subcommand's manual page for `--help`: what it does, what it needs, its exit status; then examples.
MANUAL: dict[str, tuple[str, str]] = {
    "keygen": (
        """\
Write a new Ed25519 node key to PATH, readable by its owner only (mode 0600), and print
the node ID derived from it (16 hex digits): the node's place on the overlay's ring.

Needs: a PATH that does not exist yet (an existing key is never overwritten) in a
directory the caller may write.

Exit status: 0 when the key was written; 1 with one line on stderr when it was not.""",
        """\
examples:
  ipop-overlay keygen /var/lib/ipop-overlay/office/node.key""",
    ),
    "join": (
        """\
Run a node in the foreground until SIGINT or SIGTERM: log in to the XMPP server with the
config's [xmpp] account, enter the group's room, get a membership certificate from an
issuer (unless [group] open = true), create the TAP device, open the UDP listen socket and
the control socket, and take a place in the overlay. Logs go to stderr. On SIGINT/SIGTERM
the node tells its neighbours, closes its links and removes its TAP device and socket.

Needs: CAP_NET_ADMIN (root, or the systemd unit in dist/systemd) for the TAP device; the
node key ([node] key, from 'ipop-overlay keygen'); a config that passes 'ipop-overlay check'.
A server that does not answer yet is waited for, with backoff.

Exit status: 0 after a clean stop; 1 with one line on stderr when the node cannot start
(bad config or key file, refused login, no such room, not a member), leaving nothing behind.""",
        """\
examples:
  ipop-overlay join --config /etc/ipop-overlay/node.toml
  systemctl start ipop-overlay@office     # the same, as a service: /etc/ipop-overlay/office.toml""",
    ),
    "check": (
        """\
Try what 'join' needs, without joining: read the config and the node key (and on an issuer
the group key and its state file), open a TCP connection to the XMPP server, send one STUN
Binding request to every [ice] STUN server, make an allocation on every TURN server with its
username and password and release it at once, and bind the UDP listen address. No TAP
device is created, no login is tried and the room is not entered. Prints one line per check,
"ok" or "FAIL" and the reason, then what 'join' would do with this config.

Needs: the config and the files it names; no root (a listen port below 1024 needs
CAP_NET_BIND_SERVICE). The XMPP password and room membership are only tried by 'join'.

Exit status: 0 when every check passed; 1 when any failed; 2 when the config cannot be
used (one line on stderr).""",
        """\
examples:
  ipop-overlay check --config /etc/ipop-overlay/office.toml
  ipop-overlay check --config node.toml --timeout 2""",
    ),
    "graph": (
        """\
Collect the whole overlay's links through the overlay itself and write a picture of it.
The running node asks every member it learns of for its link list (routed to that member,
at most 50 questions a second and 16 outstanding; each member answers at most 20 a second),
follows the peers in each answer, and stops when every member answered or --timeout passed.
A progress bar shows members answered / known. The file is GraphML (networkx), Graphviz DOT
or a PNG (matplotlib: pip install 'ipop-overlay[plot]') drawn with each member on a circle at
its ring position; `ipop-overlay sim --load FILE.graphml` routes over it for what-if runs.

Needs: a running node and permission to open its control socket: --control, or the
[node] control_socket of --config, or /run/ipop-overlay/node.sock.

Exit status: 0 when every member answered and the file was written; 1 when some did not
answer in time (the file is written and marked partial: GraphML/DOT attribute complete=false,
silent members with answered=false, drawn red) or nothing could be written.""",
        """\
examples:
  ipop-overlay graph --out overlay.graphml
  ipop-overlay graph --config /etc/ipop-overlay/office.toml --out overlay.png --timeout 60""",
    ),
    "status": (
        """\
Show a running node's state, read from its control socket: node ID, virtual address, room,
membership certificate, overlay and join state, DHT records, and one row per link (peer,
kind of path, endpoint, RTT, bytes each way, roles in the ring).

Needs: a running node and permission to open its control socket: --control, or the
[node] control_socket of --config, or /run/ipop-overlay/node.sock.

Exit status: 0 when the node answered; 1 with one line on stderr when none did.""",
        """\
examples:
  ipop-overlay status
  ipop-overlay status --config /etc/ipop-overlay/office.toml --json""",
    ),
    "group": (
        """\
The group's signing key and the room's member list.
  init --out DIR       write a new group key (DIR/group.key, mode 0600) and DIR/group.pub,
                       and print the public key every member pins in [group] public_key
  create|add|remove|list --config FILE [JID ...]
                       log in with the [xmpp] account of a node config and create the
                       members-only room or edit or show its member list; an issuer
                       revokes a removed member's certificate within a minute

Needs: for init, a directory for the key; for the others, a config whose account owns the
room (or administers it, for add, remove and list).

Exit status: 0 on success; 1 with one line on stderr when the server refused or a file
cannot be used.""",
        """\
examples:
  ipop-overlay group init --out /var/lib/ipop-overlay/office/group
  ipop-overlay group add --config owner.toml alice@example.test bob@example.test""",
    ),
    "friend": (
        """\
A SocialVPN node's friends: XMPP contacts with a mutual subscription, as Pidgin makes them too.
  add JID              ask JID to be a friend (and approve its request when it asks back)
  accept JID           approve JID's request, and ask back
  remove JID           end the friendship (both subscriptions), or decline a request
  list                 friends, and requests both ways
  forget JID/RESOURCE  drop the key the running node pinned for that friend device, after
                       its owner confirmed the new key it presents (status shows a warning)

Needs: --config FILE, a config with a [social] section; add, accept, remove and list log in
with its [xmpp] account under a resource of their own; forget asks the running node.

Exit status: 0 on success; 1 with one line on stderr when the server refused, the node is
not running (forget) or the config cannot be used.""",
        """\
examples:
  ipop-overlay friend add --config alice.toml bob@example.test
  ipop-overlay friend forget --config alice.toml bob@example.test/laptop""",
    ),
}
