"""The local Gradio demo (``edgevlm demo``); the app is :mod:`app` in this folder.

In a wheel this folder is the package ``edgevlm._demo`` (see pyproject.toml); nothing here is imported
until the demo starts, so gradio stays an optional dependency.
"""
