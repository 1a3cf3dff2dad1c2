"""Example plugins (the seed's OpenWeatherMap integration and node)."""
