-- The ten users with the most plays, and their level now.
SELECT u.user_id, u.first_name, u.last_name, u.level, COUNT(*) AS plays
FROM songplays p
JOIN users u ON u.user_id = p.user_id
GROUP BY u.user_id, u.first_name, u.last_name, u.level
ORDER BY plays DESC, u.user_id
LIMIT 10
