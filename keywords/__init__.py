"""Mobile-originated SMS: what subscribers text to our short codes, and what we do about it."""
