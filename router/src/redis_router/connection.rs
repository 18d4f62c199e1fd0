//! One connection type over a single Redis and a Redis Cluster, so the
//! router's logic is written once.
//!
//! Both kinds are multiplexed and cheap to clone; every request clones the
//! handle. Single commands and scripts go through [`ConnectionLike`] (the
//! cluster routes them by key). Batches of independent single-key commands
//! go through [`Connection::batch`]: one pipeline per chunk on a single
//! Redis, and on a cluster one pipeline per hash slot (the redis crate's
//! cluster pipelines refuse commands for different slots), sent
//! concurrently so that each node's multiplexed connection writes them
//! together.

use std::collections::HashMap;
use std::time::Duration;

use futures::{StreamExt, stream};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::{Cmd, ErrorKind, Pipeline, RedisFuture, RedisResult, TlsCertificates, Value};

/// Most commands in one pipeline; bigger batches are split.
const PIPELINE_MAX: usize = 512;

/// Most pipelines of one batch in flight at once.
const BATCH_CONCURRENCY: usize = 64;

/// Reconnection attempts of a single-Redis connection before a request fails.
const RECONNECT_RETRIES: usize = 3;

/// Longest pause between two reconnection attempts.
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);

/// Retries of a cluster request after a redirection or a node failure.
const CLUSTER_RETRIES: u32 = 3;

/// A connection to a single Redis or to a Redis Cluster.
#[derive(Clone)]
pub(crate) enum Connection {
    /// One Redis, reconnected in the background when the link breaks.
    Single(ConnectionManager),
    /// A Redis Cluster, routed per key.
    Cluster(ClusterConnection),
}

impl Connection {
    /// Connects to one Redis (one URL) or to the cluster these seed URLs belong to.
    ///
    /// `timeout` bounds each connection attempt and each response.
    /// `tls_ca` (PEM) replaces the system's roots for `rediss://` URLs.
    pub(crate) async fn open(
        urls: &[String],
        timeout: Duration,
        tls_ca: Option<&[u8]>,
    ) -> RedisResult<Connection> {
        let certs = || TlsCertificates {
            client_tls: None,
            root_cert: tls_ca.map(<[u8]>::to_vec),
        };
        match urls {
            [] => Err((ErrorKind::InvalidClientConfig, "no redis url").into()),
            [url] => {
                let client = if tls_ca.is_some() {
                    redis::Client::build_with_tls(url.as_str(), certs())?
                } else {
                    redis::Client::open(url.as_str())?
                };
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(RECONNECT_RETRIES)
                    .set_max_delay(RECONNECT_MAX_DELAY);
                let manager = client.get_connection_manager_with_config(config).await?;
                Ok(Connection::Single(manager))
            }
            seeds => {
                let mut builder = ClusterClient::builder(seeds.iter().map(String::as_str))
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(CLUSTER_RETRIES);
                if tls_ca.is_some() {
                    builder = builder.certs(certs());
                }
                let client = builder.build()?;
                Ok(Connection::Cluster(client.get_async_connection().await?))
            }
        }
    }

    /// Runs independent single-key commands, each given with its key's slot,
    /// and returns their replies in the same order.
    pub(crate) async fn batch(&self, commands: Vec<(Slot, Cmd)>) -> RedisResult<Vec<Value>> {
        let count = commands.len();
        let pipelines = match self {
            Connection::Single(_) => chunked(commands),
            Connection::Cluster(_) => per_slot(commands),
        };
        let mut replies = vec![Value::Nil; count];
        let mut done = stream::iter(pipelines.into_iter().map(|(indices, pipeline)| {
            let mut connection = self.clone();
            async move {
                let values: Vec<Value> = pipeline.query_async(&mut connection).await?;
                Ok::<_, redis::RedisError>((indices, values))
            }
        }))
        .buffer_unordered(BATCH_CONCURRENCY);
        while let Some(result) = done.next().await {
            let (indices, values) = result?;
            if values.len() != indices.len() {
                return Err((
                    ErrorKind::UnexpectedReturnType,
                    "pipeline reply count differs from its command count",
                )
                    .into());
            }
            for (index, value) in indices.into_iter().zip(values) {
                replies[index] = value;
            }
        }
        Ok(replies)
    }
}

/// Splits commands into pipelines of at most [`PIPELINE_MAX`], in order.
fn chunked(commands: Vec<(Slot, Cmd)>) -> Vec<(Vec<usize>, Pipeline)> {
    let mut pipelines: Vec<(Vec<usize>, Pipeline)> = Vec::new();
    for (index, (_, command)) in commands.into_iter().enumerate() {
        match pipelines.last_mut() {
            Some((indices, pipeline)) if indices.len() < PIPELINE_MAX => {
                indices.push(index);
                pipeline.add_command(command);
            }
            _ => {
                let mut pipeline = redis::pipe();
                pipeline.add_command(command);
                pipelines.push((vec![index], pipeline));
            }
        }
    }
    pipelines
}

/// Groups commands into one pipeline per hash slot (split at [`PIPELINE_MAX`]).
fn per_slot(commands: Vec<(Slot, Cmd)>) -> Vec<(Vec<usize>, Pipeline)> {
    let mut pipelines: Vec<(Vec<usize>, Pipeline)> = Vec::new();
    let mut open: HashMap<Slot, usize> = HashMap::new();
    for (index, (slot, command)) in commands.into_iter().enumerate() {
        match open.get(&slot) {
            Some(&at) if pipelines[at].0.len() < PIPELINE_MAX => {
                let (indices, pipeline) = &mut pipelines[at];
                indices.push(index);
                pipeline.add_command(command);
            }
            _ => {
                let mut pipeline = redis::pipe();
                pipeline.add_command(command);
                open.insert(slot, pipelines.len());
                pipelines.push((vec![index], pipeline));
            }
        }
    }
    pipelines
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(connection) => connection.req_packed_command(cmd),
            Connection::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
            Connection::Cluster(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(connection) => connection.get_db(),
            Connection::Cluster(connection) => connection.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(key: &str) -> (Slot, Cmd) {
        let mut cmd = redis::cmd("GET");
        cmd.arg(key);
        (Slot::for_key(key), cmd)
    }

    #[test]
    fn chunks_keep_order_and_size() {
        let commands = (0..1100).map(|i| get(&format!("k{i}"))).collect();
        let pipelines = chunked(commands);
        assert!(pipelines.iter().all(|(i, p)| i.len() == p.len()));
        let sizes: Vec<usize> = pipelines.iter().map(|(i, _)| i.len()).collect();
        assert_eq!(sizes, [512, 512, 76]);
        let order: Vec<usize> = pipelines.into_iter().flat_map(|(i, _)| i).collect();
        assert_eq!(order, (0..1100).collect::<Vec<_>>());
    }

    #[test]
    fn commands_of_one_slot_share_a_pipeline() {
        // Same hash tag, same slot; different tags, most likely other slots.
        let commands = vec![get("a:{u1}"), get("b:{u2}"), get("c:{u1}")];
        let pipelines = per_slot(commands);
        let groups: Vec<Vec<usize>> = pipelines.into_iter().map(|(i, _)| i).collect();
        assert_eq!(groups, [vec![0, 2], vec![1]]);
    }
}
