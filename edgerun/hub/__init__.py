"""Hub-side tools: packaging, signing, publishing releases and watching the fleet."""
