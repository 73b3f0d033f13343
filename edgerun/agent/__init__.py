"""The device agent: takes signed model releases over MQTT and swaps them in without downtime."""

from edgerun.agent.agent import Agent

__all__ = ["Agent"]
