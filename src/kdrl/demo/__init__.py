"""Demos: the CPU demo on SmolLM2 (`kdrl demo`) and a fully synthetic one (`--synthetic`)."""
