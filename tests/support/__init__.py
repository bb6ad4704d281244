"""Test doubles shared by integration tests (an in-memory Flower Grid with fault hooks)."""
