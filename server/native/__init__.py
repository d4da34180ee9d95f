"""The native ollm routes: health, models, plan, prompt and sessions."""
