"""`finetune demo`: the Gradio page, what it accepts, and the engine that renders adapters side by side."""
