"""OPoT: ordered proof of transit for service function chains, keyed by QKD (OPENQKD UC 15).

The pure core, in three modules:

    pot.py     the proof of transit of draft-ietf-sfc-proof-of-transit over the 64-bit prime
               field (Shamir shares, Lagrange polynomial constants, per-packet RND and CML),
               the controller that derives profiles from QKD randomness, and the three roles
               (Ingress, Transit, Egress) in plain and ordered mode
    masks.py   the per-link masks of ordered PoT (Aguado et al., JOCN 12(4), 2020): each
               adjacent pair of nodes shares a QKD key, expanded per packet with AES-256-CTR
               at the packet's sequence number; rekeyed make-before-break (a KeyInstaller)
    wire.py    the proof on the wire: an NSH (RFC 8300) header, MD type 2, with one TLV of
               an experimental MD class carrying profile bit, key phase, sequence, RND, CML
    errors.py  InvalidProof (the one opaque verification failure) and NotKeyed

The data plane, gateway lifecycle and key sessions build on these.
"""
