"""The engine: a synchronous step loop on its own thread, and the asyncio facade in front of it."""
