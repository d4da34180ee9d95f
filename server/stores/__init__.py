"""Server-side state that must outlive one request: stored responses and sessions."""
