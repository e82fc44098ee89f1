"""The IPsec gateway: QKD-keyed kernel ESP security associations over XFRM netlink."""
