"""Profiles: the YAML description of a node's firmware."""

from cbios.profile.loader import available, load_profile, load_schema, profile_hash
from cbios.profile.model import Profile, parse_size

__all__ = ["Profile", "available", "load_profile", "load_schema", "parse_size", "profile_hash"]
