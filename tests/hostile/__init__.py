"""Hostile and broken images: a corpus of cases, each with the exact outcome expected."""
