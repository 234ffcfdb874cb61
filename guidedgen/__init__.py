"""Guided ControlNet generation of segmentation datasets (builds on ``al``)."""
