"""The node's boot state: the two copies in grubenv, their verity roots, the scrub, and
what runs at boot (slots up, the health report)."""
