"""MoETune's local Gradio app (thin: it starts `moetune train` and draws its events)."""
