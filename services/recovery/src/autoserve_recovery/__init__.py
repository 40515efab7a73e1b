"""AutoServe Health recovery service."""
