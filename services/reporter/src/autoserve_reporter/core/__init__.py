"""The reporter's pure core: rows from events, report assembly, incidents. No I/O, no asyncio."""
