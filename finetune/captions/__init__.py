"""Captions: sidecar files, metadata files, templates and tags, their encodings, and their token counts."""
