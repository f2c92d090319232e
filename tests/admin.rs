//! Topic provisioning, the dev broker and the generator, as a user runs them.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use courier::app::{auto_create_topics, Provisioned};
use courier::testing::{
    courier_command, output_within, rand_id, ChildProcess, Log, ServiceProcess, TestKafka,
};
use courier::transport::admin::{AdminError, TopicOutcome};
use courier::transport::TopicAdmin;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_topics_are_fine_and_refused_creation_names_the_missing_ones() {
    let k = TestKafka::new(2);
    let config = k.config(&[]);
    let admin = TopicAdmin::new(&config).unwrap();
    let done = admin.create_all(&config).await.unwrap();
    assert!(
        done.iter().all(|(_, o)| *o == TopicOutcome::Exists),
        "{done:?}"
    );
    assert_eq!(done.len(), 5, "source, 3 retry levels, DLQ");
    let listed = admin.list().await.unwrap();
    let ours: Vec<_> = listed
        .iter()
        .filter(|t| t.name.starts_with(&k.source))
        .collect();
    assert_eq!(ours.len(), 5);
    assert!(ours.iter().all(|t| t.partitions == 2));

    // The mock broker has no CreateTopics API: a missing topic gets a clear refusal.
    let missing = format!("missing-{}", rand_id());
    let config = k.config(&[("KAFKA_PRODUCER_TOPIC", &missing)]);
    match admin.create_all(&config).await {
        Err(AdminError::Refused { missing: names, .. }) => assert_eq!(names, vec![missing.clone()]),
        Ok(done) => assert!(
            done.contains(&(missing.clone(), TopicOutcome::Created)),
            "{done:?}"
        ),
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[test]
fn topics_commands_print_and_explain() {
    let k = TestKafka::new(1);
    let out = output_within(courier_command(["topics", "list"]).envs(k.env(&[])), T);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("TOPIC\tPARTITIONS"), "{text}");
    assert!(text.contains(&format!("{}\t1", k.dlq)), "{text}");
    let out = output_within(courier_command(["topics", "create"]).envs(k.env(&[])), T);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("{}\texists", k.source)));
    let out = output_within(
        courier_command(["topics", "list"])
            .env("KAFKA_BROKERS", "127.0.0.1:1")
            .env("LOG_LEVEL", "error"),
        T,
    );
    assert!(!out.status.success(), "an unreachable broker fails");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the broker at 127.0.0.1:1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_create_reports_each_topic_and_degrades_cleanly_when_refused() {
    let k = TestKafka::new(1);
    let missing = format!("missing-{}", rand_id());
    let env = [
        ("KAFKA_AUTO_CREATE_TOPICS", "true"),
        ("KAFKA_PRODUCER_ALLOWED_TOPICS", missing.as_str()),
    ];
    // The service as a user runs it (started first: the refusal takes a while, and the
    // in-process check below runs meanwhile): it tries at start-up, says what it could not
    // create, and serves anyway.
    let mut child = ServiceProcess::spawn(
        "producer",
        &k.service_env(&env)
            .set("LOG_FORMAT", "json")
            .set("LOG_LEVEL", "info"),
        Log::Piped,
    );

    assert!(
        auto_create_topics(&k.config(&[])).await.is_empty(),
        "nothing is attempted while KAFKA_AUTO_CREATE_TOPICS is off"
    );
    let got: BTreeMap<String, Provisioned> = auto_create_topics(&k.config(&env))
        .await
        .into_iter()
        .collect();
    let mut want: BTreeMap<String, Provisioned> = k
        .all_topics()
        .into_iter()
        .map(|t| (t, Provisioned::Exists))
        .collect();
    // The mock broker has no CreateTopics API: the missing topic is refused, by name.
    let reason = match got.get(&missing) {
        Some(Provisioned::Failed { reason }) => reason.clone(),
        other => panic!("{missing}: {other:?} in {got:?}"),
    };
    assert!(
        reason.contains("refused") && reason.contains(&missing),
        "{reason}"
    );
    want.insert(missing.clone(), Provisioned::Failed { reason });
    assert_eq!(got, want, "one outcome per topic of the configuration");

    let stderr = child.take_stderr().expect("piped stderr");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let refusal = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("the producer logs the refused topic within 30 s");
        if line.contains("Topic provisioning failed") && line.contains(&missing) {
            break line;
        }
    };
    assert!(refusal.contains("\"level\":\"WARN\""), "{refusal}");
    child.wait_ready(T).await;
    child.signal("TERM");
    let status = child.wait(T).await;
    assert!(status.success(), "exit 0 after SIGTERM: {status:?}");
}

#[test]
fn dev_broker_prints_bootstrap_first_and_serves_until_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bootstrap");
    let topic = format!("dev-{}", rand_id());
    let mut child = ChildProcess::spawn(
        courier_command(["dev-broker", "--bootstrap-file"])
            .arg(&file)
            .env("KAFKA_CONSUMER_TOPICS", &topic)
            .env("KAFKA_TOPIC_PARTITIONS", "3")
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let mut first = String::new();
    BufReader::new(child.take_stdout().unwrap())
        .read_line(&mut first)
        .unwrap();
    let bootstrap = first.trim().to_owned();
    assert!(bootstrap.starts_with("127.0.0.1:"), "{bootstrap}");
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), bootstrap);
    let out = output_within(
        courier_command(["topics", "list"]).env("KAFKA_BROKERS", &bootstrap),
        T,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{topic}\t3")) && text.contains("events-dlq\t3"),
        "{text}"
    );
    child.signal("TERM");
    assert!(child.wait_blocking(T).success());
}

#[test]
fn generator_publishes_count_events_and_exits() {
    let k = TestKafka::new(2);
    let out = output_within(
        courier_command([
            "producer",
            "--generate",
            "--rate",
            "500",
            "--count",
            "40",
            "--types",
            "order_created,payment_received",
        ])
        .envs(k.env(&[])),
        T,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let msgs = k.read_all(&k.source, 40, Duration::from_secs(20));
    assert_eq!(msgs.len(), 40);
    for m in &msgs {
        let v: serde_json::Value = serde_json::from_slice(m.payload.as_deref().unwrap()).unwrap();
        assert!(["order_created", "payment_received"].contains(&v["type"].as_str().unwrap()));
        assert_eq!(m.message_id().unwrap(), v["id"].as_str().unwrap());
    }
    let bad = output_within(
        courier_command(["producer", "--generate", "--types", "refund"]).envs(k.env(&[])),
        T,
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown type `refund`"));
}
