"""Gradio tabs: layout and event wiring only; handlers are plain module-level functions."""
