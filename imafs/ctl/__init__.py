"""The control socket: a channel to a mount's daemon outside the mount
(``STATE/control.sock``), for ``imafs ns`` and ``imafs oci-hook``.

protocol.py  the wire format and its bounds (both sides)
server.py    the daemon's side (trio), peer checks, operations -> imafs/ima/hostns.py
client.py    finding and checking a mount's daemon, requests
profiles.py  host-side options: profiles, the hook's configuration, host files loaded
oci.py       the OCI runtime hook (state on stdin, bundle root, create/remove)
"""
