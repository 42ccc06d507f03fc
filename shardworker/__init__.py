"""shardworker: the library a shardsup app imports, and the child-process runtime."""
from .app import Agent, App, Timer, Topic
from .stream import Event, Stream

__version__ = "0.1.0"
__all__ = ["Agent", "App", "Event", "Stream", "Timer", "Topic", "__version__"]
