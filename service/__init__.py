"""chatlog: an event-sourced conversation log service for AI chat applications."""
