"""The ROS 2 generator's phrasing tables: slot words, units, number formats, templates per command
family and politeness wrappers. ``lorakit.tasks.ros2`` cuts each table into train and test entries."""

from __future__ import annotations

# Word slots: any entry may fill the slot. Signed slots: the entry list follows the sign (+, -).
WORD_SLOTS: dict[str, tuple[str, ...]] = {
    "move": ("move", "drive", "go", "head", "travel", "roll"),
    "moving": ("moving", "driving", "going", "heading", "travelling", "rolling"),
    "turn": ("turn", "rotate", "spin", "pivot"),
    "turning": ("turning", "rotating", "spinning", "pivoting"),
    "robot": ("", "robot ", "the robot "),
}
SIGNED_SLOTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "dir": (("forward", "forwards", "ahead", "straight ahead"),
            ("backward", "backwards", "back", "in reverse")),
    "rot": (("left", "to the left", "counter-clockwise", "counterclockwise", "anticlockwise",
             "anti-clockwise"), ("right", "to the right", "clockwise")),
    "side": (("left",), ("right",)),
}
SPEED_UNITS = (" m/s", " m/s", "m/s", " meters per second", " metres per second")
DEGREE_UNITS = (" degrees", " degrees", " deg", "°")  # {angle}; {angle_adj} uses "-degree"/" degree"
COORD_FORMATS = ("({x}, {y})", "({x},{y})", "x={x}, y={y}", "x={x} y={y}", "x {x} and y {y}",
                 "{x}, {y}", "x: {x}, y: {y}", "x = {x}, y = {y}", "x {x}, y {y}")
TOPIC_PHRASES: dict[str, tuple[str, ...]] = {
    "/odom": ("odometry", "the odometry", "odometry data", "wheel odometry", "the odom topic", "/odom",
              "the /odom topic"),
    "/scan": ("the laser scan", "laser scan data", "lidar", "the lidar", "lidar data", "/scan",
              "the scan topic"),
    "/imu": ("the IMU", "IMU data", "imu readings", "the inertial measurement unit", "/imu", "the imu topic"),
    "/battery_state": ("battery state", "the battery state", "battery status", "the battery level",
                       "/battery_state", "the battery_state topic"),
    "/camera/image_raw": ("camera images", "the camera feed", "the raw camera image", "camera image data",
                          "/camera/image_raw", "the camera topic"),
    "/tf": ("transforms", "the transforms", "tf", "the tf topic", "/tf", "the TF transforms",
            "coordinate frame transforms"),
    "/cmd_vel": ("velocity commands", "the velocity commands", "cmd_vel", "the cmd_vel topic", "/cmd_vel",
                 "twist commands"),
}

# Template families: (kind, templates). Entries 3, 7, 11, ... are test-only.
TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "drive": ("drive", (
        "{move} {robot}{dir} at {speed}", "{move} {dir} with a speed of {speed}", "{speed} {dir}",
        "{move} {robot}{dir} at a speed of {speed}", "set the linear velocity to {speed} {dir}",
        "make the robot {move} {dir} at {speed}", "{move} {dir} {speed}", "start {moving} {dir} at {speed}",
        "{dir} at {speed}", "keep {moving} {dir} at {speed}", "at {speed}, {move} {dir}",
        "{move} {dir} and hold {speed}", "I need the robot to {move} {dir} at {speed}", "{dir} {speed}",
        "proceed {dir} at {speed}", "send the robot {dir} at {speed}")),
    "reverse": ("drive", (  # backward only
        "reverse at {speed}", "back up at {speed}", "back the robot up at {speed}",
        "reverse the robot at {speed}", "back up, {speed}", "back away at {speed}", "retreat at {speed}",
        "put it in reverse at {speed}")),
    "turn": ("turn", (
        "{turn} {robot}{rot} {angle}", "{turn} {angle} {rot}", "{turn} {rot} by {angle}",
        "make a {angle_adj} turn {rot}", "{rot} {angle}", "{turn} the robot {angle} {rot}",
        "do a {angle_adj} {side} turn", "{turn} through {angle} {rot}", "change heading by {angle} {rot}",
        "yaw {rot} {angle}", "{angle} {rot}", "I need a {angle_adj} rotation {rot}",
        "{turn} {rot} {angle} in place", "{turn} in place {angle} {rot}", "swing {rot} {angle}",
        "give me {angle} of rotation {rot}")),
    "turn90": ("turn", (  # no angle given: 90 degrees
        "{turn} {robot}{rot}", "take a {side} turn", "hang a {side}", "make a quarter turn {rot}",
        "{turn} {rot} in place", "face {side}", "do a quarter turn {rot}", "{turn} {rot} a quarter turn",
        "{side} turn", "quarter turn {rot}", "{turn} {robot}{rot} on the spot", "give me a {side} turn")),
    "drive_turn": ("drive_turn", (
        "{move} {dir} at {speed} while {turning} {rot} {angle}",
        "{move} {dir} at {speed} and {turn} {rot} {angle}",
        "{turn} {rot} {angle} while {moving} {dir} at {speed}",
        "{move} {dir} at {speed} but {turn} {angle} {rot} as you go",
        "curve {rot} {angle} while {moving} {dir} at {speed}", "at {speed} {dir}, {turn} {rot} {angle}",
        "{move} {dir} at {speed} with a {angle_adj} turn {rot}", "arc {rot} {angle} at {speed} {dir}",
        "{speed} {dir} and {angle} {rot}", "{move} {dir} at {speed} while {turning} {angle} {rot}",
        "{move} {dir} at {speed} steering {rot} {angle}",
        "{turn} {angle} {rot} and {move} {dir} at {speed}")),
    "drive_turn90": ("drive_turn", (  # no angle given: 90 degrees
        "{move} {dir} at {speed} while {turning} {rot}", "{move} {dir} at {speed} and {turn} {rot}",
        "curve {rot} while {moving} {dir} at {speed}", "{move} {dir} at {speed} and bear {side}",
        "arc {rot} {dir} at {speed}", "{turn} {rot} while {moving} {dir} at {speed}",
        "{speed} {dir} and {turn} {rot}", "{move} {dir} at {speed} with a quarter turn {rot}")),
    "navigate": ("navigate", (
        "navigate to position {xy}", "go to {xy}", "move to the point {xy}", "send the robot to {xy}",
        "navigate to {xy}", "drive to coordinates {xy}", "set a navigation goal at {xy}", "head over to {xy}",
        "travel to location {xy}", "navigate the robot to {xy} on the map", "plan a path to {xy}",
        "I need you at {xy}", "go to the position {xy}", "move to pose {xy}", "navigate to the goal {xy}",
        "make your way to {xy}", "your goal is {xy}", "get to {xy}")),
    "stop": ("stop", (
        "stop the robot", "stop", "halt", "stop moving", "emergency stop", "freeze", "come to a stop",
        "bring the robot to a halt", "stop all motion", "halt the robot", "stop right there", "full stop",
        "stop the motors", "hold position", "zero the velocity", "stand still")),
    "topic_list": ("topic_list", (
        "list all topics", "list the topics", "show me the ROS topics", "what topics are available?",
        "show all active topics", "which topics are being published?", "list ROS 2 topics",
        "give me the topic list", "display the available topics", "what topics exist?",
        "print the list of topics", "enumerate the topics")),
    "node_list": ("node_list", (
        "list all nodes", "list the nodes", "show me the running nodes", "what nodes are running?",
        "which nodes are active?", "list ROS 2 nodes", "display all nodes", "give me the node list",
        "show the active ROS nodes", "what nodes exist?", "print the list of nodes", "enumerate the nodes")),
    "echo": ("echo", (
        "echo {topic}", "show me {topic}", "print {topic}", "what is being published on {topic}?",
        "display {topic}", "monitor {topic}", "subscribe to {topic}", "let me see {topic}", "stream {topic}",
        "read {topic}", "watch {topic}", "listen to {topic}", "dump {topic}", "echo the messages on {topic}",
        "check {topic}", "I want to see {topic}")),
}
WRAPPERS = ("please {}", "{}, please", "could you {}?", "would you kindly {}?", "robot, {}", "can you {}?",
            "I'd like you to {}", "hey robot, {}", "{} please", "kindly {}", "robot, please {}",
            "go ahead and {}", "I want you to {}", "{} now", "please {}, thanks", "{}, thank you")
# Templates that read badly inside a wrapper ("could you what topics exist?") are never wrapped.
NO_WRAP_STARTS = ("what", "which", "i ", "your", "at ", "{speed}", "{dir}", "{rot}", "{angle}")
