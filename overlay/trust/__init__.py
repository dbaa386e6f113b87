"""Group trust: the group's Ed25519 signing key, the certificates it issues to members, and its revocations.

Pure core: every check takes `now` in wall-clock seconds (certificates cross machines), and the only I/O is
the explicit key and revocation file helpers. In the manner of Nebula's `cert/`: a certificate is a small
signed struct checked in one place against the group key and the revocation blocklist.
"""
