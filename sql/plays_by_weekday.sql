-- Plays by day of the week, UTC (ISO: 1 is Monday, 7 is Sunday).
SELECT t.weekday, COUNT(*) AS plays
FROM songplays p
JOIN time t ON t.start_time = p.start_time
GROUP BY t.weekday
ORDER BY t.weekday
