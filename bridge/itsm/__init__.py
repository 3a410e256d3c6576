"""Everything that speaks to the ITSM: tokens, incident operations, a simulator."""
