"""Sounding anagrams."""
