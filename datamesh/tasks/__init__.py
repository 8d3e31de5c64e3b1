"""Celery tasks: one per saga step and per compensation, the errback, and the reaper.

Only wiring lives here: each task decodes its message, runs the step function of
:mod:`datamesh.pipeline.steps` / :mod:`datamesh.pipeline.compensation` on the worker's tiers and turns
its ``Result`` into "done", "retry later" or "failed" (which fires the chain's errback).
"""
