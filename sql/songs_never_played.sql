-- How many catalogue songs no play matched, out of all songs.
SELECT COUNT(*) AS songs, SUM(CASE WHEN played.song_id IS NULL THEN 1 ELSE 0 END) AS never_played
FROM songs s
LEFT JOIN (SELECT DISTINCT song_id FROM songplays WHERE song_id IS NOT NULL) played ON played.song_id = s.song_id
