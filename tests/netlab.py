"""Kept for imports from before the lab moved into the product (`qgw.netlab`)."""

from qgw.netlab import NETNS_ETC, REPO, SUBNET, Lab

__all__ = ["NETNS_ETC", "REPO", "SUBNET", "Lab"]
